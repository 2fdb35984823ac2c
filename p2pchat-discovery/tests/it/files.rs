//! Private files: the server's data directory is created 0700, `directory.redb` and the
//! operator key are 0600, and an operator key other users can read is refused with the fix.

#![cfg(unix)]

use std::fs::Permissions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use p2pchat_core::Identity;
use p2pchat_discovery::RedbStorage;

use super::util::*;

/// The database file in the data directory (`storage::redb::DIRECTORY_FILE`, not exported).
const DIRECTORY_FILE: &str = "directory.redb";

/// The permission bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[tokio::test]
async fn redb_storage_creates_its_directories_0700_and_its_file_0600() {
    let root = tempfile::tempdir().unwrap();
    let chosen = root.path().join("chosen");
    std::fs::create_dir(&chosen).unwrap();
    std::fs::set_permissions(&chosen, Permissions::from_mode(0o755)).unwrap();
    let data = chosen.join("a/b");
    let storage = RedbStorage::open(&data).unwrap();
    assert_eq!(mode(&chosen.join("a")), 0o700);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join(DIRECTORY_FILE)), 0o600);
    assert_eq!(mode(&chosen), 0o755, "a directory it did not create");
    drop(storage);

    // Reopened, it stays so.
    let storage = RedbStorage::open(&data).unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join(DIRECTORY_FILE)), 0o600);
    drop(storage);
}

#[tokio::test]
async fn a_directory_redb_left_0644_is_made_0600_and_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let storage = RedbStorage::open(dir.path()).unwrap();
    drop(storage);
    let file = dir.path().join(DIRECTORY_FILE);
    std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
    let storage = RedbStorage::open_with_quota(dir.path(), 10).unwrap();
    assert_eq!(mode(&file), 0o600);
    drop(storage);
}

#[tokio::test]
async fn the_binary_creates_a_private_data_dir_operator_key_and_database() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server/data");
    let server = discovery_process(&data, &["--listen", "127.0.0.1:0"]).await;
    assert_eq!(mode(&root.path().join("server")), 0o700);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("operator.key")), 0o600);
    assert_eq!(mode(&data.join(DIRECTORY_FILE)), 0o600);
    server.kill().await;
}

/// Runs the binary with `args` to its exit; returns its exit code and stderr.
async fn run_to_exit(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_p2pchat-discovery"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("it exits in time")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_binary_refuses_an_operator_key_other_users_can_read_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("operator.key");
    Identity::generate().save(&key).unwrap();
    std::fs::set_permissions(&key, Permissions::from_mode(0o644)).unwrap();
    let contents = std::fs::read_to_string(&key).unwrap();
    let fix = format!(
        "the key file {0} is readable by other users (mode 0644); run `chmod 600 {0}`",
        key.display()
    );

    // Serving.
    let (code, stderr) = run_to_exit(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&fix), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");

    // Announcing.
    let (code, stderr) = run_to_exit(&[
        "announce".as_ref(),
        "hello".as_ref(),
        "--server".as_ref(),
        "127.0.0.1:1".as_ref(),
        "--operator-key".as_ref(),
        key.as_os_str(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&fix), "stderr: {stderr}");

    // Neither replaced nor repaired the key.
    assert_eq!(std::fs::read_to_string(&key).unwrap(), contents);
    assert_eq!(mode(&key), 0o644);
}

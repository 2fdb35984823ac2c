//! Private files: the identity key is written 0600 through a fresh temporary file whatever
//! lies around it, a key file other users can read or write is refused with the fix, and
//! the directories created for keys and for the node database are 0700.

#![cfg(unix)]
// Helpers outside `#[test]` functions too: in tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::fs::Permissions;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use p2pchat_core::Identity;
use p2pchat_core::identity::IdentityError;

use super::util::World;

/// The permission bits of `path` (not following a symlink there).
fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Writes `contents` to `path` and gives it exactly `mode` (whatever the umask).
fn write_with_mode(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_leftover_identity_tmp_0644_does_not_make_the_key_0644() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    let leftover = dir.path().join("identity.tmp");
    write_with_mode(&leftover, "left by a crash", 0o644);

    let identity = Identity::generate();
    identity.save(&key).unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(
        Identity::load(&key).unwrap().public_key(),
        identity.public_key()
    );
    // The leftover was neither used nor touched.
    assert_eq!(
        std::fs::read_to_string(&leftover).unwrap(),
        "left by a crash"
    );
    assert_eq!(mode(&leftover), 0o644);

    // The same through `load_or_generate` in a fresh directory.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    write_with_mode(&dir.path().join("identity.tmp"), "left by a crash", 0o644);
    Identity::load_or_generate(&key).unwrap();
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn leftover_temporary_files_of_any_name_do_not_make_the_key_0644() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    let planted = [
        "identity.tmp",
        "identity.key.tmp",
        ".identity.key.tmp",
        ".identity.tmp",
        ".identity.key.0000000000000000.tmp",
        ".identity.key.ffffffffffffffff.tmp",
    ];
    for name in planted {
        write_with_mode(&dir.path().join(name), name, 0o644);
    }
    for _ in 0..20 {
        let identity = Identity::generate();
        identity.save(&key).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            Identity::load(&key).unwrap().public_key(),
            identity.public_key()
        );
    }
    for name in planted {
        let path = dir.path().join(name);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), name);
        assert_eq!(mode(&path), 0o644, "{name}");
    }
    // Every save cleaned up after itself: only the key was added.
    let mut expected: Vec<String> = planted.iter().map(|n| n.to_string()).collect();
    expected.push("identity.key".into());
    expected.sort();
    assert_eq!(names(dir.path()), expected);
}

// The temporary name is random, so a symlink cannot be planted where the next save will
// write. These plant one at the name the old scheme used (`identity.tmp`) and at the key
// itself: neither is followed.
#[test]
fn a_symlink_at_the_old_temporary_name_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    let victim = dir.path().join("victim");
    write_with_mode(&victim, "not a key", 0o644);
    std::os::unix::fs::symlink(&victim, dir.path().join("identity.tmp")).unwrap();
    // And a dangling one, which would create its target if followed.
    let target = dir.path().join("created-through-a-symlink");
    std::os::unix::fs::symlink(&target, dir.path().join(".identity.key.tmp")).unwrap();

    Identity::generate().save(&key).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not a key");
    assert_eq!(mode(&victim), 0o644);
    assert!(!target.exists());
    let meta = std::fs::symlink_metadata(&key).unwrap();
    assert!(meta.file_type().is_file(), "the key is a regular file");
    assert_eq!(meta.mode() & 0o7777, 0o600);
}

#[test]
fn a_symlink_at_the_key_is_replaced_not_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    let victim = dir.path().join("victim");
    write_with_mode(&victim, "not a key", 0o644);
    std::os::unix::fs::symlink(&victim, &key).unwrap();

    Identity::generate().save(&key).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not a key");
    let meta = std::fs::symlink_metadata(&key).unwrap();
    assert!(meta.file_type().is_file(), "the key is a regular file");
    assert_eq!(meta.mode() & 0o7777, 0o600);
}

#[test]
fn a_key_file_other_users_can_read_or_write_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    Identity::generate().save(&key).unwrap();
    let contents = std::fs::read_to_string(&key).unwrap();
    for (bits, access) in [
        (0o666, "readable and writable"),
        (0o644, "readable"),
        (0o640, "readable"),
        (0o604, "readable"),
        (0o620, "writable"),
        (0o601, "readable"),
    ] {
        std::fs::set_permissions(&key, Permissions::from_mode(bits)).unwrap();
        let err = Identity::load(&key).unwrap_err();
        assert!(
            matches!(err, IdentityError::Exposed { mode, .. } if mode == bits),
            "{bits:o}: {err:?}"
        );
        let shown = key.display();
        assert_eq!(
            err.to_string(),
            format!(
                "the key file {shown} is {access} by other users (mode {bits:04o}); \
                 run `chmod 600 {shown}`"
            )
        );
        // Never replaced by a fresh key, nor repaired.
        let err = Identity::load_or_generate(&key).unwrap_err();
        assert!(matches!(err, IdentityError::Exposed { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), contents);
        assert_eq!(mode(&key), bits);
    }
}

#[test]
fn a_key_file_only_its_owner_can_use_loads() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    let identity = Identity::generate();
    identity.save(&key).unwrap();
    for bits in [0o600, 0o400] {
        std::fs::set_permissions(&key, Permissions::from_mode(bits)).unwrap();
        assert_eq!(
            Identity::load(&key).unwrap().public_key(),
            identity.public_key()
        );
        assert_eq!(
            Identity::load_or_generate(&key).unwrap().public_key(),
            identity.public_key()
        );
    }
}

#[test]
fn directories_created_for_the_key_are_0700_and_existing_ones_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let chosen = dir.path().join("chosen");
    std::fs::create_dir(&chosen).unwrap();
    std::fs::set_permissions(&chosen, Permissions::from_mode(0o755)).unwrap();
    let key = chosen.join("a/b/identity.key");
    Identity::load_or_generate(&key).unwrap();
    assert_eq!(mode(&chosen.join("a")), 0o700);
    assert_eq!(mode(&chosen.join("a/b")), 0o700);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&chosen), 0o755, "a directory we did not create");
}

#[tokio::test]
async fn the_node_database_directory_is_0700_and_its_files_0600() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node/data");
    let world = World::new();
    let node = world
        .node_with(
            "alice",
            Identity::generate(),
            Some(&dir),
            world.network.clone(),
        )
        .await;
    node.shutdown().await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&root.path().join("node")), 0o700);
    let files = names(&dir);
    assert!(files.iter().any(|n| n == "node.redb"), "{files:?}");
    for name in files {
        assert_eq!(mode(&dir.join(&name)), 0o600, "{name}");
    }
}

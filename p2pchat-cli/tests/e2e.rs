//! End-to-end: the real `p2pchat` and `p2pchat-discovery` binaries, driven through pipes as a
//! script would drive them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, Server, WAIT, discovery_binary};

fn offline_line(to: &str) -> String {
    format!("({to} is offline: the message is stored and will be delivered later)")
}

#[tokio::test]
async fn two_users_chat() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    alice.say("list").await;
    alice.expect("Online users: bob").await;
    alice.say("send bob hi bob, it's alice").await;
    bob.expect("[alice] hi bob, it's alice").await;
    bob.say("send alice hello alice").await;
    alice.expect("[bob] hello alice").await;
    bob.say("help").await;
    bob.expect_line(|l| l.contains("send <user> <message>"))
        .await;
    alice.quit().await;
    bob.quit().await;
}

#[tokio::test]
async fn a_message_to_a_user_who_quit_arrives_marked_offline_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let bob = Client::start(dir.path(), "bob", &server).await;
    bob.quit().await;
    alice.say("send bob are you there?").await;
    alice.expect(&offline_line("bob")).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    bob.expect("[Offline][alice] are you there?").await;
    alice.quit().await;
    let said = bob.quit().await;
    assert_eq!(
        said.iter().filter(|l| l.contains("are you there?")).count(),
        1,
        "shown once: {said:?}"
    );
}

#[tokio::test]
async fn block_persists_and_unblock_lets_messages_through() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut carol = Client::start(dir.path(), "carol", &server).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    bob.say("block alice").await;
    bob.expect("Blocked alice: nothing from them will be shown.")
        .await;
    bob.quit().await;

    // While bob is away: alice's message, then carol's, wait in his mailbox in that order.
    alice.say("send bob you should not see this").await;
    alice.expect(&offline_line("bob")).await;
    carol.say("send bob marker").await;
    carol.expect(&offline_line("bob")).await;
    // bob comes back still blocking alice (the list persisted): carol's shows, alice's not.
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    bob.expect("[Offline][carol] marker").await;
    bob.say("unblock alice").await;
    bob.expect("Unblocked alice.").await;
    alice.say("send bob now you see me").await;
    bob.expect_line(|l| l.ends_with("[alice] now you see me"))
        .await;
    let said = bob.quit().await;
    assert!(
        !said.iter().any(|l| l.contains("you should not see this")),
        "a blocked user's message was shown: {said:?}"
    );
    alice.quit().await;
    carol.quit().await;
}

#[tokio::test]
async fn mute_hides_messages_until_it_expires_or_is_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    alice.say("send bob before the mute").await;
    bob.expect("[alice] before the mute").await;

    bob.say("mute alice 2").await;
    bob.expect("Muted alice for 2 seconds.").await;
    alice.say("send bob muted one").await;
    // The mute is a duration: let it run out.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    alice.say("send bob after the mute").await;
    bob.expect("[alice] after the mute").await;

    bob.say("mute alice 3600").await;
    bob.expect("Muted alice for 3600 seconds.").await;
    bob.say("unmute alice").await;
    bob.expect("Unmuted alice.").await;
    alice.say("send bob after the unmute").await;
    bob.expect("[alice] after the unmute").await;

    bob.say("mute alice soon").await;
    bob.expect("'soon' is not a number of seconds. Usage: mute <user> <seconds>")
        .await;
    let said = bob.quit().await;
    assert!(
        !said.iter().any(|l| l.contains("muted one")),
        "a muted message was shown: {said:?}"
    );
    alice.quit().await;
}

#[tokio::test]
async fn mistakes_are_explained_in_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    alice.say("send zed hello").await;
    alice.expect("There is no user named 'zed'.").await;
    alice.say(&format!("send alice {}", "x".repeat(10))).await;
    alice.expect("You cannot send a message to yourself.").await;
    let bob = Client::start(dir.path(), "bob", &server).await;
    alice.say(&format!("send bob {}", "x".repeat(70_000))).await;
    alice
        .expect_line(|l| l.starts_with("That message is too long: 70000 bytes"))
        .await;
    alice.say("dance").await;
    alice
        .expect("Unknown command 'dance'. Type 'help' for commands.")
        .await;
    let said = alice.quit().await;
    assert!(!said.iter().any(|l| l.contains("panicked")), "{said:?}");
    bob.quit().await;
}

#[tokio::test]
async fn a_second_key_claiming_a_taken_name_is_refused_readably() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let alice = Client::start(dir.path(), "alice", &server).await;
    // Another data directory means another identity key.
    let impostor = Client::spawn(&dir.path().join("elsewhere"), "alice", &server.addr, &[]);
    let (status, stderr) = impostor.exit_with_stderr().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("The name 'alice' is already taken by another key."),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    alice.quit().await;
}

#[tokio::test]
async fn without_a_discovery_server_the_client_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let client = Client::spawn(dir.path(), "alice", "127.0.0.1:1", &[]);
    let (status, stderr) = client.exit_with_stderr().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("Cannot reach the discovery server at 127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("p2pchat-discovery"), "{stderr}");
}

#[tokio::test]
async fn end_of_input_quits_cleanly_and_loses_nothing_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    for i in 0..20 {
        alice.say(&format!("send bob line {i}")).await;
    }
    // End of input right after: everything typed is still sent before alice exits.
    alice.quit_by_eof().await;
    for i in 0..20 {
        bob.expect_line(|l| l.ends_with(&format!("[alice] line {i}")))
            .await;
    }
    bob.quit().await;
}

#[tokio::test]
async fn operator_announcements_print_as_special_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server = Server::start(&server_dir).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(discovery_binary())
            .args(["announce", "maintenance at noon", "--server", &server.addr])
            .arg("--data-dir")
            .arg(&server_dir)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    alice.expect("[Special Message] maintenance at noon").await;
    bob.expect("[Special Message] maintenance at noon").await;
    alice.quit().await;
    bob.quit().await;
}

const NOT_REACHABLE: &str =
    "(you are not reachable directly; messages go through the server relay)";

#[tokio::test]
async fn a_user_who_cannot_be_dialed_chats_both_ways_with_one_who_can() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    // bob's published port drops every connection, as a port nobody forwards: the server's
    // probe finds he cannot be dialed.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    let _dropping = tokio::spawn(async move {
        while let Ok((stream, _)) = hole.accept().await {
            drop(stream);
        }
    });
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut bob =
        Client::start_with(dir.path(), "bob", &server.addr, &["--announce", &hole_addr]).await;
    alice.say("send bob are you behind a NAT?").await;
    bob.expect("[alice] are you behind a NAT?").await;
    bob.say("send alice yes, and I still get this at once")
        .await;
    alice
        .expect("[bob] yes, and I still get this at once")
        .await;
    let alice_said = alice.quit().await;
    let bob_said = bob.quit().await;
    assert_eq!(
        bob_said.iter().filter(|l| *l == NOT_REACHABLE).count(),
        1,
        "bob is told once: {bob_said:?}"
    );
    assert!(
        !alice_said
            .iter()
            .any(|l| l == NOT_REACHABLE || l.contains("is offline")),
        "alice is reachable, and nothing went through the mailbox: {alice_said:?}"
    );
}

#[tokio::test]
async fn two_users_who_cannot_be_dialed_chat_through_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let flag = &["--not-dialable"];
    let mut alice = Client::start_with(dir.path(), "alice", &server.addr, flag).await;
    let mut bob = Client::start_with(dir.path(), "bob", &server.addr, flag).await;
    alice.say("send bob relayed hello").await;
    bob.expect("[alice] relayed hello").await;
    bob.say("send alice relayed answer").await;
    alice.expect("[bob] relayed answer").await;
    for said in [alice.quit().await, bob.quit().await] {
        assert_eq!(
            said.iter().filter(|l| *l == NOT_REACHABLE).count(),
            1,
            "{said:?}"
        );
        assert!(!said.iter().any(|l| l.contains("is offline")), "{said:?}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_is_private_and_a_key_others_can_read_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;

    // A fresh --data-dir (and its missing parent) is created 0700, the key in it 0600.
    let root = dir.path().join("clients");
    let alice = Client::start(&root, "alice", &server).await;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("alice")), 0o700);
    assert_eq!(mode(&root.join("alice/identity.key")), 0o600);
    alice.quit().await;

    // A key file other users can read: the client says how to fix it and stops.
    let key = root.join("alice/identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = Client::spawn(&root, "alice", &server.addr, &[]);
    let (status, stderr) = refused.exit_with_stderr().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    let key = key.display();
    assert!(
        stderr.contains(&format!(
            "Cannot use the identity key {key}: the key file {key} is readable by other users \
             (mode 0644); run `chmod 600 {key}`"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        mode(&root.join("alice/identity.key")),
        0o644,
        "not repaired"
    );
}

/// `--contacts-only`, live and offline: a stranger's messages wait as requests (bob is told
/// once, `requests` lists them) until `accept` shows them; `block` discards them; a contact
/// (someone bob wrote to) is shown at once. The block list goes out to a file and into
/// another client.
#[tokio::test]
async fn contacts_only_keeps_strangers_as_requests_until_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut carol = Client::start(dir.path(), "carol", &server).await;
    let mut bob = Client::start_with(dir.path(), "bob", &server.addr, &["--contacts-only"]).await;
    bob.say("send alice hi alice").await;
    alice.expect("[bob] hi alice").await;

    // Live: carol is a stranger to bob.
    carol.say("send bob hi bob, it's carol").await;
    bob.expect("(carol wants to message you: 'accept carol' to read, 'block carol' to refuse)")
        .await;
    alice.say("send bob hello bob").await;
    bob.expect("[alice] hello bob").await;
    bob.say("requests").await;
    bob.expect("  carol (1 message)").await;
    bob.say("accept carol").await;
    bob.expect("Accepted carol: their messages are shown from now on.")
        .await;
    bob.expect("[carol] hi bob, it's carol").await;
    bob.say("requests").await;
    bob.expect("No message requests.").await;

    // Offline: dave writes while bob is away, and is blocked after.
    bob.quit().await;
    let mut dave = Client::start(dir.path(), "dave", &server).await;
    dave.say("send bob cheap watches").await;
    dave.expect(&offline_line("bob")).await;
    carol.say("send bob are you back?").await;
    carol.expect(&offline_line("bob")).await;
    let mut bob = Client::start_with(dir.path(), "bob", &server.addr, &["--contacts-only"]).await;
    // The mailbox holds both; which the node reaches first is not fixed.
    bob.expect_all(&[
        "[Offline][carol] are you back?",
        "(dave wants to message you: 'accept dave' to read, 'block dave' to refuse)",
    ])
    .await;
    bob.say("block dave").await;
    bob.expect("Blocked dave: nothing from them will be shown.")
        .await;
    bob.say("requests").await;
    bob.expect("No message requests.").await;
    let list = dir.path().join("blocked.txt");
    bob.say(&format!("blocked export {}", list.display())).await;
    bob.expect(&format!("Wrote 1 blocked users to {}.", list.display()))
        .await;
    assert_eq!(std::fs::read_to_string(&list).unwrap(), "dave\n");
    let said = bob.quit().await;
    assert!(
        !said.iter().any(|l| l.contains("cheap watches")),
        "a request was shown: {said:?}"
    );
    alice
        .say(&format!("blocked import {}", list.display()))
        .await;
    alice
        .expect(&format!("Blocked 1 more users from {}.", list.display()))
        .await;
    alice.say("blocked").await;
    alice.expect("Blocked: dave").await;
    for client in [alice, carol, dave] {
        client.quit().await;
    }
}

//! End-to-end: the real `p2pchat` and `p2pchat-discovery` binaries, driven through pipes as a
//! script would drive them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, Server, WAIT, discovery_binary, untimed};

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
    alice.expect_stored("bob").await;
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
    // Bob is online and blocks alice: she is not told she is blocked, nor anything false
    // (such as that bob is offline).
    alice.say("send bob are you there?").await;
    alice.expect_stored("bob").await;
    assert!(
        !alice.seen.iter().any(|l| l.contains("offline")),
        "alice was told something false: {:?}",
        alice.seen
    );
    bob.quit().await;

    // While bob is away: alice's message, then carol's, wait in his mailbox in that order.
    alice.say("send bob you should not see this").await;
    alice.expect_stored("bob").await;
    carol.say("send bob marker").await;
    carol.expect_stored("bob").await;
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
    bob.expect("Muted alice for 1 h.").await;
    bob.say("unmute alice").await;
    bob.expect("Unmuted alice.").await;
    alice.say("send bob after the unmute").await;
    bob.expect("[alice] after the unmute").await;

    bob.say("mute alice soon").await;
    bob.expect("'soon' is not a duration (60, 90s, 10m, 2h, 1d). Usage: mute <user> <duration>")
        .await;
    bob.say("unmute alice").await;
    bob.expect("alice is not muted.").await;
    bob.say("mute alice 0").await;
    bob.expect("Mute for at least a second. Usage: mute <user> <duration>")
        .await;
    bob.say("mute alice 18446744073709551615").await;
    bob.expect("A mute lasts at most 365 days; to hide someone for good, 'block <user>'.")
        .await;
    bob.say("mute nosuchuser 10").await;
    bob.expect("There is no user named 'nosuchuser'.").await;
    bob.say("muted").await;
    bob.expect("Nobody is muted.").await;
    bob.say("/mute alice 90m").await;
    bob.expect("Muted alice for 1 h 30 min.").await;
    bob.say("muted").await;
    bob.expect_line(|l| {
        l.starts_with("Muted: alice (1 h 29 min left)")
            || l.starts_with("Muted: alice (1 h 30 min left)")
    })
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
            .any(|l| l == NOT_REACHABLE || l.contains("cannot be reached now")),
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
        assert!(
            !said.iter().any(|l| l.contains("cannot be reached now")),
            "{said:?}"
        );
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
    dave.expect_stored("bob").await;
    carol.say("send bob are you back?").await;
    carol.expect_stored("bob").await;
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

/// The client's second generation through the real binaries: times on message lines,
/// delivery shown to the sender, `reply`, `/msg`, `query` conversations, presence lines,
/// history after a restart, and the mistakes of the old client answered with sentences.
#[tokio::test]
async fn a_conversation_shows_times_delivery_and_history_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;

    alice.say("send bob hi bob").await;
    let line = alice
        .expect_line(|l| untimed(l) == "[alice -> bob] hi bob")
        .await;
    assert_ne!(untimed(&line), line, "the sender's line has a time: {line}");
    alice.expect("(\"hi bob\" was delivered to bob)").await;
    let line = bob.expect_line(|l| untimed(l) == "[alice] hi bob").await;
    assert_ne!(untimed(&line), line, "a received line has a time: {line}");

    bob.say("reply hello alice").await;
    alice.expect("[bob] hello alice").await;
    alice.say("/msg bob slash form").await;
    bob.expect("[alice] slash form").await;
    alice.say("query bob").await;
    alice
        .expect("Talking to bob: plain lines go to bob; commands start with '/' ('/query' alone ends it).")
        .await;
    alice.say("just a line").await;
    bob.expect("[alice] just a line").await;
    alice.say("/query").await;
    alice.expect("No longer talking to bob.").await;
    alice.say("just a line").await;
    alice
        .expect("Unknown command 'just'. Type 'help' for commands.")
        .await;

    // Mistakes of the first client, now answered.
    alice.say("exit now").await;
    alice
        .expect("'quit' takes nothing after it. Usage: quit")
        .await;
    alice.say("block nosuchuser").await;
    alice.expect("There is no user named 'nosuchuser'.").await;
    alice.say("unblock bob").await;
    alice.expect("bob is not blocked.").await;
    alice.say("reply x").await;
    alice.expect("[alice -> bob] x").await;
    alice.say("help").await;
    alice
        .expect_line(|l| l.contains("quit") && l.contains("exit"))
        .await;

    // Presence: bob leaves; alice, who talks to him, is told.
    bob.quit().await;
    alice.expect("(bob went offline)").await;
    alice.quit().await;

    let mut alice = Client::start(dir.path(), "alice", &server).await;
    alice.say("history bob 4").await;
    for want in [
        "[bob] hello alice",
        "[alice -> bob] slash form",
        "[alice -> bob] just a line",
        "[alice -> bob] x",
    ] {
        let line = alice.expect_line(|l| untimed(l) == want).await;
        assert_ne!(untimed(&line), line, "history lines have times: {line}");
    }
    alice.say("history carol").await;
    alice.expect("No history with carol.").await;
    alice.quit().await;
}

/// After carol's key changes, `fingerprint carol` shows the code carol's own client shows
/// (the new one), so the check the warning asks for can succeed; `trust carol` then sends
/// what was held.
#[tokio::test]
async fn after_a_key_change_fingerprint_shows_the_new_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("server"), &["--claim-lapse-days", "0"]).await;
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    let mut carol = Client::start(dir.path(), "carol", &server).await;
    alice.say("send carol first contact").await;
    carol.expect("[alice] first contact").await;
    carol.say("fingerprint").await;
    let old = carol
        .expect_line(|l| l.starts_with("Your safety code: "))
        .await;
    carol.quit().await;
    alice.expect("(carol went offline)").await;

    // A new carol: another data directory, another key, the same name.
    let second = dir.path().join("second");
    let mut carol = Client::start(&second, "carol", &server).await;
    carol.say("fingerprint").await;
    let new = carol
        .expect_line(|l| l.starts_with("Your safety code: "))
        .await;
    assert_ne!(old, new);
    let new = new.trim_start_matches("Your safety code: ").to_owned();
    let old = old.trim_start_matches("Your safety code: ").to_owned();

    alice.say("send carol are you new?").await;
    alice
        .expect_line(|l| l.starts_with("!! WARNING: carol's key has changed."))
        .await;
    alice.say("fingerprint carol").await;
    alice
        .expect(&format!(
            "carol's safety code is now {new} (a new key, not trusted yet). The key you trusted \
             had {old}. Compare the new code with carol out of band, then 'trust carol'."
        ))
        .await;
    alice.say("trust carol").await;
    alice
        .expect("Trusted carol's new key; messages held for carol are being sent.")
        .await;
    carol.expect("[alice] are you new?").await;
    alice.say("fingerprint carol").await;
    alice.expect(&format!("carol's safety code: {new}")).await;
    for client in [alice, carol] {
        client.quit().await;
    }
}

/// The server connection: lost and back is said; when the same key signs in elsewhere the
/// old client says so and stops (failing), instead of staying up and useless.
#[tokio::test]
async fn the_client_says_when_the_server_goes_and_comes_back_and_stops_when_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server = Server::start(&server_dir).await;
    let addr = server.addr.clone();
    let mut alice = Client::start(dir.path(), "alice", &server).await;
    server.kill().await;
    alice
        .expect_line(|l| l.starts_with("(lost the connection to the discovery server: "))
        .await;
    let server = Server::start_with(&server_dir, &["--listen", &addr]).await;
    alice
        .expect("(connected to the discovery server again)")
        .await;

    // Alice's key, copied to another data directory, signs in there.
    let second = dir.path().join("second");
    std::fs::create_dir_all(second.join("alice")).unwrap();
    let key = second.join("alice").join("identity.key");
    std::fs::copy(dir.path().join("alice").join("identity.key"), &key).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(second.join("alice"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let elsewhere = Client::start(&second, "alice", &server).await;
    alice
        .expect_line(|l| l.starts_with("(the discovery server ended this session: "))
        .await;
    let (status, stderr) = alice.exit_by_itself().await;
    assert!(!status.success(), "the replaced client fails");
    assert!(
        stderr.contains("signed in elsewhere with the same key"),
        "{stderr}"
    );
    elsewhere.quit().await;
}

/// `--json`: one JSON object per line for every event and every answer.
#[tokio::test]
async fn json_mode_prints_one_object_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server")).await;
    let mut bob = Client::start(dir.path(), "bob", &server).await;
    let mut bot = Client::spawn(dir.path(), "bot", &server.addr, &["--json"]);
    let parse = |l: &str| serde_json::from_str::<serde_json::Value>(l);
    bot.expect_line(|l| parse(l).is_ok_and(|v| v["event"] == "started" && v["user"] == "bot"))
        .await;
    bot.say("send bob beep").await;
    let sent = bot
        .expect_line(|l| parse(l).is_ok_and(|v| v["to"] == "bob" && v["sent"].is_string()))
        .await;
    let id = parse(&sent).unwrap()["sent"].as_str().unwrap().to_owned();
    bot.expect_line(|l| {
        parse(l).is_ok_and(|v| v["event"] == "delivered" && v["id"] == id.as_str())
    })
    .await;
    bob.expect("[bot] beep").await;
    bob.say("send bot boop").await;
    bot.expect_line(|l| {
        parse(l).is_ok_and(|v| v["event"] == "message" && v["from"] == "bob" && v["text"] == "boop")
    })
    .await;
    bot.say("dance").await;
    bot.expect_line(|l| {
        parse(l).is_ok_and(|v| {
            v["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("Unknown command"))
        })
    })
    .await;
    bot.say("list").await;
    bot.expect_line(|l| parse(l).is_ok_and(|v| v["reply"] == "Online users: bob"))
        .await;
    let said = bot.quit().await;
    for line in &said {
        assert!(parse(line).is_ok(), "not JSON: {line}");
    }
    bob.quit().await;
}

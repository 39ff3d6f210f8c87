//! Flow control and send buffers over loopback: a receiver that does not read stops the
//! sender after a bounded amount of data, and nothing is lost once it reads again.

mod common;

use std::time::Duration;

use common::{
    QUIET, assert_nothing_more, builder, receive, shutdown_all, start_client, start_server, within,
};
use slic::Target;

const KIB: u32 = 1024;
/// Padding per message; with the postcard framing a message is a little over 1000 bytes.
const PAD: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_read_stops_the_sender_and_then_gets_everything_in_order() {
    const BUFFER_CAP: usize = 64 * 1024;
    const WINDOW: u32 = 64 * KIB;
    let (server, addr) = start_server(
        builder("slow")
            .channel_window(WINDOW)
            .connection_window(WINDOW),
    )
    .await;
    let (client, peer) = start_client(builder("fast").buffer_cap(BUFFER_CAP), addr).await;

    let pad = vec![0xA5_u8; PAD];
    let encoded_len = slic::Codec::Postcard.encode(&(0_u32, &pad)).unwrap().len();
    assert!(encoded_len >= PAD);

    // try_send until the buffer is full, giving the connection task time to move what the
    // window allows onto the wire; stop once Full persists across several retries.
    let mut accepted: u32 = 0;
    let mut full_in_a_row = 0;
    for _ in 0..10_000 {
        match client.try_send(Target::Peer(peer), &(accepted, &pad)) {
            Ok(_) => {
                accepted += 1;
                full_in_a_row = 0;
            }
            Err(slic::Error::Full(p)) => {
                assert_eq!(p, peer);
                full_in_a_row += 1;
                if full_in_a_row == 5 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("try_send failed with {e}"),
        }
    }
    assert_eq!(
        full_in_a_row, 5,
        "try_send never reported Full ({accepted} sent)"
    );

    // Memory is bounded: what was accepted fits in the receiver's window (what went over the
    // wire) plus the sender's buffer (what waits), at 20 bytes of header per message.
    let cost = encoded_len + 20;
    let bound = (WINDOW as usize + BUFFER_CAP) / cost + 2;
    assert!(
        (accepted as usize) <= bound,
        "{accepted} messages of {cost} bytes accepted, more than window + buffer allow ({bound})"
    );
    // And both the window and the buffer were used, so data did leave while nobody read.
    assert!(
        (accepted as usize) > BUFFER_CAP / cost,
        "only {accepted} messages accepted: nothing went over the wire"
    );

    // A waiting send waits.
    let mut pending = {
        let client = client.clone();
        let pad = pad.clone();
        tokio::spawn(async move { client.send(Target::Peer(peer), &(accepted, &pad)).await })
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut pending)
            .await
            .is_err(),
        "send completed although the buffer is full and the receiver reads nothing"
    );
    assert!(matches!(
        client.try_send(Target::Peer(peer), &0_u8),
        Err(slic::Error::Full(_))
    ));

    // The receiver reads: every message, in order, including the one that waited.
    for expected in 0..=accepted {
        let m = receive(&server).await;
        let (seq, body): (u32, Vec<u8>) = m.decode().unwrap();
        assert_eq!(seq, expected, "lost or reordered message");
        assert_eq!(body, pad);
    }
    within("pending send", pending)
        .await
        .expect("send task")
        .expect("send succeeds once the receiver reads");
    assert_nothing_more(&server, "server").await;

    // And the connection is back to normal.
    client.try_send(Target::Peer(peer), &u32::MAX).unwrap();
    assert_eq!(receive(&server).await.decode::<u32>().unwrap(), u32::MAX);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_reader_is_idle_does_not_hold_up_another_channel() {
    const STUCK: u32 = 100;
    const FLOWING: u32 = 1_000;
    // A small channel window and a roomy connection window: one channel's unread data
    // cannot starve the connection.
    let (server, addr) = start_server(
        builder("hub")
            .channel_window(16 * KIB)
            .connection_window(4096 * KIB),
    )
    .await;
    let (client, peer) = start_client(builder("pc"), addr).await;
    let idle = within("open", client.open_channel(peer)).await.unwrap();
    let busy = within("open", client.open_channel(peer)).await.unwrap();
    let mut theirs = Vec::new();
    for _ in 0..2 {
        theirs.push(within("accept", server.accept_channel()).await.unwrap());
    }
    theirs.sort_by_key(|c| c.id());
    let (idle_theirs, busy_theirs) = (&theirs[0], &theirs[1]);
    assert_eq!(idle_theirs.id(), idle.id());
    assert_eq!(busy_theirs.id(), busy.id());

    let pad = vec![7_u8; PAD];
    // ~100 KB on a channel whose window is 16 KiB: most of it waits in the send buffer.
    for i in 0..STUCK {
        within("idle send", idle.send(&(i, &pad))).await.unwrap();
    }
    // ~1 MB on the other channel, far beyond its window: it needs the reader's credit.
    let writer = tokio::spawn(async move {
        for i in 0..FLOWING {
            busy.send(&(i, &pad)).await.unwrap();
        }
        busy
    });
    for expected in 0..FLOWING {
        let m = within("busy receive", busy_theirs.receive()).await.unwrap();
        assert_eq!(m.decode::<(u32, Vec<u8>)>().unwrap().0, expected);
    }
    let _busy = within("writer", writer).await.unwrap();

    // The idle channel got at most its window's worth over the wire so far, and all of it
    // arrives once its reader starts.
    for expected in 0..STUCK {
        let m = within("idle receive", idle_theirs.receive()).await.unwrap();
        assert_eq!(m.decode::<(u32, Vec<u8>)>().unwrap().0, expected);
    }
    assert!(
        tokio::time::timeout(QUIET, idle_theirs.receive())
            .await
            .is_err(),
        "extra message on the idle channel"
    );
    shutdown_all(&[&client, &server]).await;
}

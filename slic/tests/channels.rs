//! Channels over loopback: concurrent writers on several channels of one connection, per-channel
//! ordering, and closing one channel without disturbing the others.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{QUIET, builder, shutdown_all, start_client, start_server, wait_event, within};
use slic::{Channel, ChannelId, Event, Initiator, Node, PeerId};

/// Opens `n` channels from `client` to its peer and accepts them on `server`; returns the
/// client's handles in opening order and the server's handles by id.
async fn open_channels(
    client: &Node,
    peer: PeerId,
    server: &Node,
    n: usize,
) -> (Vec<Arc<Channel>>, HashMap<ChannelId, Arc<Channel>>) {
    let mut ours = Vec::new();
    for _ in 0..n {
        let ch = within("open_channel", client.open_channel(peer))
            .await
            .unwrap();
        ours.push(Arc::new(ch));
    }
    let mut theirs = HashMap::new();
    for _ in 0..n {
        let ch = within("accept_channel", server.accept_channel())
            .await
            .unwrap();
        assert_eq!(&*ch.peer().name, "pc");
        theirs.insert(ch.id(), Arc::new(ch));
    }
    let mut ids: Vec<_> = ours.iter().map(|c| c.id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "channel ids are distinct");
    for id in &ids {
        assert_ne!(*id, ChannelId(0));
        assert_eq!(id.0 % 2, 1, "a client opens odd ids");
        assert!(
            theirs.contains_key(id),
            "server did not accept channel {id}"
        );
    }
    (ours, theirs)
}

/// Reads `count` messages from `ch`, expecting `(ch.id, first..first+count)` in order.
async fn expect_sequence(ch: &Channel, first: u32, count: u32) {
    for seq in first..first + count {
        let m = within("channel receive", ch.receive()).await.unwrap();
        assert_eq!(m.channel, ch.id());
        let (tag, got): (u32, u32) = m.decode().unwrap();
        assert_eq!(tag, ch.id().0, "message of another channel on {}", ch.id());
        assert_eq!(got, seq, "out of order on channel {}", ch.id());
    }
}

/// Sends `(ch.id, first..first+count)` on `ch`.
async fn send_sequence(ch: &Channel, first: u32, count: u32) {
    for seq in first..first + count {
        within("channel send", ch.send(&(ch.id().0, seq)))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_channels_written_concurrently_each_deliver_their_own_messages_in_order() {
    const N: u32 = 2_000;
    let (server, addr) = start_server(builder("hub")).await;
    let (client, peer) = start_client(builder("pc"), addr).await;
    let (ours, theirs) = open_channels(&client, peer, &server, 4).await;

    let readers: Vec<_> = theirs
        .values()
        .map(|ch| {
            let ch = ch.clone();
            tokio::spawn(async move { expect_sequence(&ch, 0, N).await })
        })
        .collect();
    let writers: Vec<_> = ours
        .iter()
        .map(|ch| {
            let ch = ch.clone();
            tokio::spawn(async move { send_sequence(&ch, 0, N).await })
        })
        .collect();
    for w in writers {
        within("writer task", w).await.unwrap();
    }
    for r in readers {
        within("reader task", r).await.unwrap();
    }
    // Nothing leaked onto channel 0 or stayed behind on a channel.
    assert!(
        within("node receive", server.receive_timeout(QUIET))
            .await
            .unwrap()
            .is_none()
    );
    for ch in theirs.values() {
        assert!(
            tokio::time::timeout(QUIET, ch.receive()).await.is_err(),
            "extra message on channel {}",
            ch.id()
        );
    }
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_one_of_four_channels_leaves_the_others_working_and_both_sides_see_it_closed() {
    const N: u32 = 200;
    let (server, addr) = start_server(builder("hub")).await;
    let mut server_events = server.events();
    let (client, peer) = start_client(builder("pc"), addr).await;
    let mut client_events = client.events();
    let (ours, theirs) = open_channels(&client, peer, &server, 4).await;

    // Every channel works before the close.
    for ch in &ours {
        send_sequence(ch, 0, N).await;
    }
    for ch in &ours {
        expect_sequence(&theirs[&ch.id()], 0, N).await;
    }

    let closed = ours[1].clone();
    let closed_id = closed.id();
    // Messages queued before the close are still delivered, then the close.
    send_sequence(&closed, N, 5).await;
    closed.close();
    assert!(matches!(
        within("send on closed channel", closed.send(&(closed_id.0, 0_u32))).await,
        Err(slic::Error::ChannelClosed(id)) if id == closed_id
    ));

    let ev = wait_event(&mut client_events, "client ChannelClosed", |e| {
        matches!(e, Event::ChannelClosed { .. })
    })
    .await;
    let Event::ChannelClosed {
        peer: p,
        channel,
        initiator,
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(channel, closed_id);
    assert_eq!(initiator, Initiator::Local);
    assert_eq!(&*p.name, "hub");

    let ev = wait_event(&mut server_events, "server ChannelClosed", |e| {
        matches!(e, Event::ChannelClosed { .. })
    })
    .await;
    let Event::ChannelClosed {
        peer: p,
        channel,
        initiator,
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(channel, closed_id);
    assert_eq!(initiator, Initiator::Remote);
    assert_eq!(&*p.name, "pc");

    let their_closed = &theirs[&closed_id];
    expect_sequence(their_closed, N, 5).await;
    assert!(matches!(
        within("receive on closed channel", their_closed.receive()).await,
        Err(slic::Error::ChannelClosed(id)) if id == closed_id
    ));

    // The other three go on working, in both directions.
    for ch in ours.iter().filter(|c| c.id() != closed_id) {
        send_sequence(ch, N, N).await;
    }
    for ch in ours.iter().filter(|c| c.id() != closed_id) {
        let theirs = &theirs[&ch.id()];
        expect_sequence(theirs, N, N).await;
        send_sequence(theirs, 0, 10).await;
        expect_sequence(ch, 0, 10).await;
    }
    // No other channel was reported closed, and the connection is still up.
    for events in [&mut client_events, &mut server_events] {
        if let Ok(Some(e)) = tokio::time::timeout(QUIET, events.recv()).await {
            panic!("unexpected event after the close: {e:?}");
        }
    }
    assert_eq!(client.peers().len(), 1);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_accepting_side_ends_the_openers_reads_and_is_reported_to_the_opener()
 {
    let (server, addr) = start_server(builder("hub")).await;
    let (client, peer) = start_client(builder("pc"), addr).await;
    let mut client_events = client.events();
    let (ours, theirs) = open_channels(&client, peer, &server, 2).await;

    let id = ours[0].id();
    send_sequence(&theirs[&id], 0, 3).await;
    theirs[&id].close();
    // What the accepting side queued before its close is delivered, then reads end.
    expect_sequence(&ours[0], 0, 3).await;
    assert!(matches!(
        within("receive on closed channel", ours[0].receive()).await,
        Err(slic::Error::ChannelClosed(c)) if c == id
    ));
    let client_ev = wait_event(
        &mut client_events,
        "client ChannelClosed",
        |e| matches!(e, Event::ChannelClosed { channel, .. } if *channel == id),
    )
    .await;
    assert!(
        matches!(
            client_ev,
            Event::ChannelClosed {
                initiator: Initiator::Remote,
                ..
            }
        ),
        "{client_ev:?}"
    );
    // The other channel still works.
    send_sequence(&ours[1], 0, 10).await;
    expect_sequence(&theirs[&ours[1].id()], 0, 10).await;
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_by_the_peer_is_reported_closed_exactly_once() {
    let (server, addr) = start_server(builder("hub")).await;
    let (client, peer) = start_client(builder("pc"), addr).await;
    let mut client_events = client.events();
    let (ours, theirs) = open_channels(&client, peer, &server, 1).await;

    let id = ours[0].id();
    theirs[&id].close();
    wait_event(
        &mut client_events,
        "client ChannelClosed",
        |e| matches!(e, Event::ChannelClosed { channel, .. } if *channel == id),
    )
    .await;
    // A round trip, so that anything the client still had to report has been forwarded.
    within("ping", server.send(slic::Target::All, &1_u8))
        .await
        .unwrap();
    within("pong", client.receive()).await.unwrap();
    if let Ok(Some(e)) = tokio::time::timeout(QUIET, client_events.recv()).await {
        panic!("unexpected second event after the close: {e:?}");
    }
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accepting_side_that_closes_a_channel_sees_it_closed_too() {
    let (server, addr) = start_server(builder("hub")).await;
    let mut server_events = server.events();
    let (client, peer) = start_client(builder("pc"), addr).await;
    let (ours, theirs) = open_channels(&client, peer, &server, 1).await;

    let id = ours[0].id();
    theirs[&id].close();
    let server_ev = wait_event(
        &mut server_events,
        "server ChannelClosed",
        |e| matches!(e, Event::ChannelClosed { channel, .. } if *channel == id),
    )
    .await;
    assert!(
        matches!(
            server_ev,
            Event::ChannelClosed {
                initiator: Initiator::Local,
                ..
            }
        ),
        "{server_ev:?}"
    );
    // Its own handle's reads end too, as Channel::receive documents.
    assert!(matches!(
        within("receive on own closed channel", theirs[&id].receive()).await,
        Err(slic::Error::ChannelClosed(c)) if c == id
    ));
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_past_the_accept_queue_limit_are_closed_and_the_rest_wait_to_be_accepted() {
    let (server, addr) = start_server(builder("hub").max_pending_channels(3)).await;
    let (client, peer) = start_client(builder("pc2"), addr).await;
    let mut opened = Vec::new();
    for _ in 0..5 {
        opened.push(within("open", client.open_channel(peer)).await.unwrap());
    }
    // The last two did not fit in the queue: the server closed them, and the opener sees it.
    for ch in &opened[3..] {
        assert!(
            matches!(
                within("closed", ch.receive()).await,
                Err(slic::Error::ChannelClosed(_))
            ),
            "channel {} should have been refused",
            ch.id()
        );
    }
    // The first three wait, in order, and work once accepted.
    for ch in &opened[..3] {
        ch.send(&ch.id().0).await.unwrap();
        let theirs = within("accept", server.accept_channel()).await.unwrap();
        assert_eq!(theirs.id(), ch.id());
        assert_eq!(receive_on(&theirs).await, ch.id().0);
    }
    shutdown_all(&[&client, &server]).await;
}

async fn receive_on(ch: &Channel) -> u32 {
    within("channel receive", ch.receive())
        .await
        .unwrap()
        .decode()
        .unwrap()
}

//! The ECS JSON writer against plain serde, on the event the agent writes most: a
//! listener start with its shared parts (host, agent, process, user, cgroup) already
//! rendered once, as at full churn.
//!
//! `cargo run --release -p portwatch --example render_bench [EVENTS]` prints, for each of
//! five interleaved rounds, ns per event for `output::json::write_event` and for
//! `serde_json::to_writer` (the same bytes: the unit test `same_as_serde` checks that),
//! then the medians and their ratio.

use std::{hint::black_box, net::IpAddr, time::Instant};

use portwatch::{
    output::event::{
        Action, Agent, Boot, Cgroup, Event, Host, Named, Network, Parent, Process, Server, Socket,
        shared,
    },
    socket::Protocol,
};

fn event() -> Event {
    let mut ev = Event::new(
        Action::ListenStarted,
        1_795_741_780_451_005_964,
        1_795_741_780_451_276_043,
        shared(Host {
            name: "vm".into(),
            id: Some("3d1219c7c4c5404aaa1f6d2a48adfda4".into()),
            boot: Some(Boot {
                id: "30b29330-2651-4064-8817-e539dacb01e9".into(),
            }),
        }),
        shared(Agent {
            type_: "portwatch",
            name: "portwatch",
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
    ev.network = Some(Network {
        transport: Protocol::Tcp,
        type_: "ipv4",
    });
    ev.server = Some(Server {
        ip: IpAddr::from([127, 0, 0, 1]),
        port: 40_000,
    });
    ev.process = Some(shared(Process {
        pid: 10_849,
        name: Some("loadgen".into()),
        parent: Some(Parent { pid: 10_843 }),
        executable: Some("/work/main/target/release/loadgen".into()),
        command_line: Some("loadgen --tcp --seconds 3".into()),
        args: Some(vec![
            "loadgen".into(),
            "--tcp".into(),
            "--seconds".into(),
            "3".into(),
        ]),
        start_ns: Some(1_795_741_780_358_453_171),
        entity_id: Some("7b72bf9fd06433c9".into()),
        executable_owner: Some(0),
    }));
    let root = shared(Named {
        id: "0".into(),
        name: Some("root".into()),
    });
    ev.user = Some(root.clone());
    ev.group = Some(root);
    ev.portwatch.cgroup = Some(shared(Cgroup {
        id: Some(1),
        path: Some("/user.slice/user-0.slice/session-1.scope".into()),
    }));
    ev.portwatch.attribution = Some("proc");
    ev.portwatch.socket = Some(Socket {
        inode: Some(297_522_928),
        netns: Some(4_026_531_833),
        host_netns: Some(true),
        v6only: None,
        kernel: false,
        implicit_bind: false,
        thread_id: Some(10_849),
        pids: Vec::new(),
    });
    ev
}

/// ns per event over `n` events, each with its own sequence, times and socket.
fn round(ev: &mut Event, n: u64, mut write: impl FnMut(&mut Vec<u8>, &Event)) -> f64 {
    let mut buf = Vec::with_capacity(4096);
    let start = Instant::now();
    for i in 0..n {
        ev.event.sequence = i;
        ev.time_ns += 1_000;
        ev.event.created_ns += 1_000;
        if let Some(s) = ev.portwatch.socket.as_mut() {
            s.inode = Some(297_522_928 + i);
        }
        buf.clear();
        write(&mut buf, ev);
        black_box(&buf);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500_000);
    let mut ev = event();
    let (mut hand, mut serde) = (Vec::new(), Vec::new());
    // Same bytes, or the comparison means nothing.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    portwatch::output::json::write_event(&mut a, &ev).expect("render");
    serde_json::to_writer(&mut b, &ev).expect("render");
    assert_eq!(a, b, "the two writers disagree");
    println!("events per round: {n}; {} bytes per event", a.len());
    for r in 1..=5 {
        let h = round(&mut ev, n, |buf, ev| {
            portwatch::output::json::write_event(buf, ev).expect("render")
        });
        let s = round(&mut ev, n, |buf, ev| {
            serde_json::to_writer(buf, ev).expect("render")
        });
        println!("round {r}: json.rs {h:7.1} ns/event   serde {s:7.1} ns/event");
        hand.push(h);
        serde.push(s);
    }
    let (h, s) = (median(hand), median(serde));
    println!(
        "median: json.rs {h:.1} ns/event ({:.0} k events/s), serde {s:.1} ns/event ({:.0} k events/s): serde takes {:.2}x the time",
        1e6 / h,
        1e6 / s,
        s / h
    );
}

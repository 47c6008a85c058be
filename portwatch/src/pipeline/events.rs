//! Events from what the sensor learned: the common fields every event carries (host,
//! agent, clocks), a listener's event from its socket and owner, and the
//! `listener-present` event of a socket found in /proc. Shared by the running sensor
//! ([`super::agent`]) and the one-shot `portwatch snapshot` ([`crate::inventory`]).

use std::{collections::HashMap, path::PathBuf};

use crate::{
    attribution::{
        enrich::{Enricher, Owner},
        procfs, scan,
    },
    kernel::ring::Transport,
    output::event::{
        Action, Agent, Boot, Event, Host, Named, Network, Server, Shared, Socket, shared,
    },
    socket::Protocol,
};

/// The socket half of a listener event.
pub(crate) struct Listener {
    pub transport: Transport,
    /// UDP-Lite (handled as UDP, reported as `udplite`).
    pub udplite: bool,
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub socket: Socket,
    pub user: Option<Shared<Named>>,
    pub group: Option<Shared<Named>>,
}

fn host_info(boot_id: &str, machine_id: Option<String>) -> Shared<Host> {
    shared(Host {
        name: procfs::hostname(),
        id: machine_id,
        boot: (!boot_id.is_empty()).then(|| Boot {
            id: boot_id.to_owned(),
        }),
    })
}

/// Builds events: attribution (the enricher and its caches), the host and agent fields,
/// and the kernel's rule for the urgent lane.
pub struct Events {
    pub enricher: Enricher,
    host: Shared<Host>,
    agent: Shared<Agent>,
    pub host_netns: Option<u64>,
    /// Ports the kernel treats as important (one bit each), as loaded into RISKY_PORTS.
    pub important_ports: Vec<u64>,
}

impl Events {
    pub fn new(cgroup_root: PathBuf, important_ports: Vec<u64>) -> Events {
        let boot_id = procfs::boot_id().unwrap_or_default();
        let machine_id = procfs::machine_id().ok();
        Events {
            enricher: Enricher::new(cgroup_root, machine_id.as_deref().unwrap_or(""), &boot_id),
            host: host_info(&boot_id, machine_id),
            agent: shared(Agent {
                type_: "portwatch",
                name: "portwatch",
                version: env!("CARGO_PKG_VERSION"),
            }),
            host_netns: scan::own_netns().ok(),
            important_ports,
        }
    }

    /// Wall-clock time now, in nanoseconds.
    pub fn now(&self) -> i128 {
        self.enricher
            .clocks
            .wall_from_ktime(crate::time::monotonic_ns())
    }

    /// An event with the common fields; `event.sequence` is set when it is written.
    pub fn base(&mut self, wall_ns: i128, action: Action) -> Event {
        Event::new(
            action,
            wall_ns,
            self.now(),
            self.host.clone(),
            self.agent.clone(),
        )
    }

    pub(crate) fn listener_event(
        &mut self,
        action: Action,
        wall_ns: i128,
        l: Listener,
        owner: &Owner,
    ) -> Event {
        let Listener {
            transport,
            udplite,
            addr,
            port,
            socket,
            user,
            group,
        } = l;
        let mut ev = self.base(wall_ns, action);
        ev.network = Some(Network {
            transport: Protocol::new(transport, udplite),
            type_: if addr.is_ipv4() { "ipv4" } else { "ipv6" },
        });
        ev.server = Some(Server { ip: addr, port });
        ev.process = owner.process.clone();
        ev.user = user;
        ev.group = group;
        ev.container = owner.container.clone();
        ev.portwatch.systemd = owner.systemd.clone();
        ev.portwatch.cgroup = owner.cgroup.clone();
        ev.portwatch.process = owner.argv_cut.clone();
        ev.portwatch.attribution = Some(owner.attribution);
        ev.portwatch.attribution_changed = owner.changed.clone();
        ev.portwatch.socket = Some(socket);
        ev.portwatch.urgent = self.important(addr, port);
        ev
    }

    /// The `listener-present` event for one socket found in /proc. `owners` caches
    /// attribution per owning pid set (a forked server shares one socket among many).
    pub fn present(
        &mut self,
        f: &scan::Found,
        wall_ns: i128,
        owners: &mut HashMap<Vec<u32>, Owner>,
    ) -> (Event, Owner, Option<Shared<Named>>) {
        let owner = match owners.get(&f.owners) {
            Some(o) => o.clone(),
            None => {
                let o = if f.owner_hidden {
                    Owner {
                        attribution: "unknown",
                        ..Owner::default()
                    }
                } else {
                    self.enricher.owner_for_pids(&f.owners)
                };
                owners.insert(f.owners.clone(), o.clone());
                o
            }
        };
        let transport = f.socket.transport.transport();
        let user = Some(self.enricher.user(f.socket.uid));
        let inode = f.socket.inode;
        let socket = Socket {
            inode: (inode != 0).then_some(inode),
            netns: Some(f.netns_ino),
            host_netns: self.host_netns.map(|h| h == f.netns_ino),
            v6only: f.v6only,
            kernel: owner.kernel,
            implicit_bind: false,
            thread_id: None,
            pids: f.owners.clone(),
        };
        let l = Listener {
            transport,
            udplite: f.socket.transport.is_udplite(),
            addr: f.socket.addr,
            port: f.socket.port,
            socket,
            user: user.clone(),
            group: None,
        };
        let ev = self.listener_event(Action::ListenerPresent, wall_ns, l, &owner);
        (ev, owner, user)
    }

    /// The kernel's rule for the urgent lane (portwatch-ebpf/src/deliver.rs), for events
    /// made here (the snapshot): a port the catalogue or the rules call risky, or an
    /// address that is not loopback.
    fn important(&self, addr: std::net::IpAddr, port: u16) -> bool {
        let loopback = match addr {
            std::net::IpAddr::V4(a) => a.is_loopback(),
            std::net::IpAddr::V6(a) => {
                a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        };
        !loopback
            || self
                .important_ports
                .get(usize::from(port) / 64)
                .is_some_and(|w| w & (1 << (port % 64)) != 0)
    }
}

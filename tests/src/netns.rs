//! Network namespaces joined by veth links, for tests that cut the network between processes.
//!
//! Every address lives inside a namespace the test created: nothing is added to the host's own
//! interfaces. The test process reaches a namespace's services from a thread that entered it
//! ([`in_netns`]).

use std::process::Command;

use crate::run_ok;

/// One veth link between two namespaces, with the routes each side needs.
#[derive(Debug, Clone)]
pub struct Link {
    pub a: String,
    pub b: String,
    /// The interface names in `a` and `b`.
    pub a_if: String,
    pub b_if: String,
    subnet: u8,
    a_serves: Vec<String>,
    b_serves: Vec<String>,
}

/// Network namespaces and veth links, removed on drop.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
    /// The second octet of the link subnets (10.`octet`.`subnet`.0/30).
    octet: u8,
}

impl Net {
    /// Names start with `tag` (one lowercase letter per kind of test, so two test binaries
    /// running at once never remove each other's links) and the process id.
    pub fn new(tag: char, octet: u8) -> Net {
        // Short: interface names are limited to 15 bytes.
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        // Links of an earlier run of this kind (namespaces are torn down asynchronously, or a
        // run was killed) would shadow this run's routes: remove them.
        let links = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("");
            let Some(rest) = name.strip_prefix(tag) else { continue };
            let ours = rest.split(['a', 'b']).count() == 2
                && rest.chars().all(|c| c.is_ascii_digit() || c == 'a' || c == 'b');
            if ours {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
        Net { prefix, namespaces: Vec::new(), octet }
    }

    /// A new namespace with its loopback up.
    pub fn ns(&mut self, name: &str) -> String {
        let ns = format!("{}{name}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run_ok("ip", &["netns", "add", &ns]);
        run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// A point-to-point link between namespaces `a` and `b` on 10.`octet`.`subnet`.0/30 (`a`
    /// gets .1, `b` gets .2), each side routing to the other's service addresses.
    pub fn link(&self, a: &str, b: &str, subnet: u8, a_serves: &[&str], b_serves: &[&str]) -> Link {
        let (a_if, b_if) = (format!("{}a{subnet}", self.prefix), format!("{}b{subnet}", self.prefix));
        run_ok("ip", &["link", "add", &a_if, "netns", a, "type", "veth", "peer", "name", &b_if, "netns", b]);
        let link = Link {
            a: a.to_owned(),
            b: b.to_owned(),
            a_if,
            b_if,
            subnet,
            a_serves: a_serves.iter().map(|s| (*s).to_owned()).collect(),
            b_serves: b_serves.iter().map(|s| (*s).to_owned()).collect(),
        };
        for (ns, ifname, me) in [(a, &link.a_if, 1), (b, &link.b_if, 2)] {
            run_ok(
                "ip",
                &["-n", ns, "addr", "add", &format!("10.{}.{subnet}.{me}/30", self.octet), "dev", ifname],
            );
        }
        self.heal(&link);
        link
    }

    /// Takes the link down on `a`'s side: packets on it are lost both ways.
    pub fn cut(&self, link: &Link) {
        run_ok("ip", &["-n", &link.a, "link", "set", &link.a_if, "down"]);
    }

    /// Brings both sides up and routes again (the kernel drops routes through a link that went
    /// down).
    pub fn heal(&self, link: &Link) {
        let sides = [(&link.a, &link.a_if, 2, &link.b_serves), (&link.b, &link.b_if, 1, &link.a_serves)];
        for (ns, ifname, _, _) in sides {
            run_ok("ip", &["-n", ns, "link", "set", ifname, "up"]);
        }
        for (ns, ifname, peer, routes) in sides {
            let via = format!("10.{}.{}.{peer}", self.octet, link.subnet);
            for r in routes {
                run_ok("ip", &["-n", ns, "route", "replace", &format!("{r}/32"), "via", &via, "dev", ifname]);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a new thread inside network namespace `ns`, with a runtime of its own (sockets it
/// opens belong to that namespace); returns what `f` returned.
pub fn in_netns<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap()
}

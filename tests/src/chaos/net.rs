//! Test hosts in network namespaces: one namespace per process, each with its own address,
//! joined through a router namespace; partitions are policy rules in the router.
//!
//! ```text
//!   host (root namespace) 10.77.N.254 --veth-- router namespace --veth-- node "jm1" 10.77.N.41
//!                                                 |  (ip_forward)  --veth-- node "tm1" 10.77.N.51
//!                                                 +-- ip rule from A to B blackhole (a cut)
//! ```
//!
//! Every node reaches every other node through the router, so a cut of one direction of one
//! pair of nodes is one `ip rule add from A to B blackhole` there: the router drops those
//! packets silently (no ICMP, as with a pulled cable; TCP connections time out). The host link
//! is never cut: the runner keeps producing, reading and observing every process during a
//! partition. Only iproute2 is needed (this machine's kernel has no qdiscs for `tc` and there
//! is no iptables/nft binary).
//!
//! Names carry a tag unique to the run and the subnet `10.77.N.0/24` is taken with a lock file
//! under `/tmp/keel-chaos-net/`, so parallel runs do not collide. [`Network`]'s drop deletes
//! the namespaces (which deletes their veth pairs and routes). Leftovers of a runner that was
//! killed (its lock file names a dead pid) are removed by the next run: the processes in its
//! namespaces are killed, then the namespaces and the host link deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context as _};

const LOCK_DIR: &str = "/tmp/keel-chaos-net";
/// The host's address in every run's subnet.
const HOST_OCTET: u8 = 254;
/// The router's address (on every router-side veth).
const ROUTER_OCTET: u8 = 1;

/// Runs a command, failing with its stderr.
fn run(args: &[&str]) -> anyhow::Result<String> {
    let (program, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let out = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why namespaces cannot be made here, or `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse::<u32>().ok()));
    if uid != Some(0) {
        return Some(format!("not root (effective uid {uid:?}); network namespaces need root"));
    }
    if run(&["ip", "-V"]).is_err() {
        return Some("the `ip` command (iproute2) is missing; scripts/install-deps.sh installs it".into());
    }
    let probe = format!("kc-probe-{}", std::process::id());
    if let Err(e) = run(&["ip", "netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e:#}"));
    }
    let veth = run(&[
        "ip", "link", "add", "kcprobe0", "netns", &probe, "type", "veth", "peer", "name", "kcprobe1",
        "netns", &probe,
    ]);
    let _ = run(&["ip", "netns", "del", &probe]);
    if let Err(e) = veth {
        return Some(format!("cannot create a veth pair: {e:#}"));
    }
    None
}

/// One node: its namespace and address.
#[derive(Debug, Clone)]
pub struct NodeNet {
    pub ns: String,
    pub ip: String,
}

/// Rules of one cut, removed by [`Network::heal`].
#[derive(Debug, Default)]
pub struct Cut {
    prefs: Vec<u32>,
    /// For the report: `a -> b` pairs.
    pub pairs: Vec<(String, String)>,
}

/// The namespaces of one run.
pub struct Network {
    tag: String,
    subnet: u8,
    router: String,
    host_if: String,
    nodes: BTreeMap<String, NodeNet>,
    next_pref: u32,
    active: Vec<u32>,
    lock: PathBuf,
}

impl Network {
    /// Creates the router, the host link and one namespace per `(name, last octet)`.
    pub fn create(nodes: &[(&str, u8)]) -> anyhow::Result<Network> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        clean_stale();
        let tag = unique_tag();
        let (subnet, lock) = take_subnet(&tag)?;
        let mut net = Network {
            router: format!("kc-{tag}-router"),
            host_if: format!("kc{tag}h"),
            tag,
            subnet,
            nodes: BTreeMap::new(),
            next_pref: 1000,
            active: Vec::new(),
            lock,
        };
        lock_live().push((net.tag.clone(), net.lock.clone()));
        net.build(nodes).context("building the network namespaces")?;
        Ok(net)
    }

    fn addr(&self, octet: u8) -> String {
        format!("10.77.{}.{octet}", self.subnet)
    }

    fn build(&mut self, nodes: &[(&str, u8)]) -> anyhow::Result<()> {
        let router = self.router.clone();
        let gw = self.addr(ROUTER_OCTET);
        run(&["ip", "netns", "add", &router])?;
        run(&["ip", "-n", &router, "link", "set", "lo", "up"])?;
        run(&["ip", "netns", "exec", &router, "sysctl", "-qw", "net.ipv4.ip_forward=1"]).or_else(|_| {
            // Without sysctl(8): write the proc file inside the namespace.
            run(&["ip", "netns", "exec", &router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        })?;
        for (name, octet) in nodes {
            let ns = format!("kc-{}-{name}", self.tag);
            let ip = self.addr(*octet);
            let (r_if, n_if) = (format!("kc{}r{octet}", self.tag), format!("kc{}n{octet}", self.tag));
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &r_if, "netns", &router, "type", "veth", "peer", "name", &n_if, "netns",
                &ns,
            ])?;
            run(&["ip", "-n", &ns, "link", "set", &n_if, "name", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "route", "add", &gw, "dev", "eth0", "scope", "link"])?;
            run(&["ip", "-n", &ns, "route", "add", "default", "via", &gw, "dev", "eth0"])?;
            run(&["ip", "-n", &router, "link", "set", &r_if, "up"])?;
            run(&["ip", "-n", &router, "addr", "add", &format!("{gw}/32"), "dev", &r_if])?;
            run(&["ip", "-n", &router, "route", "add", &format!("{ip}/32"), "dev", &r_if, "scope", "link"])?;
            self.nodes.insert((*name).to_string(), NodeNet { ns, ip });
        }
        let host = self.addr(HOST_OCTET);
        let router_host_if = format!("kc{}H", self.tag);
        run(&[
            "ip",
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &router_host_if,
            "netns",
            &router,
        ])?;
        run(&["ip", "-n", &router, "link", "set", &router_host_if, "up"])?;
        run(&["ip", "-n", &router, "addr", "add", &format!("{gw}/32"), "dev", &router_host_if])?;
        run(&[
            "ip",
            "-n",
            &router,
            "route",
            "add",
            &format!("{host}/32"),
            "dev",
            &router_host_if,
            "scope",
            "link",
        ])?;
        run(&["ip", "link", "set", &self.host_if, "up"])?;
        run(&["ip", "addr", "add", &format!("{host}/32"), "dev", &self.host_if])?;
        run(&[
            "ip",
            "route",
            "add",
            &format!("10.77.{}.0/24", self.subnet),
            "via",
            &gw,
            "dev",
            &self.host_if,
            "onlink",
        ])?;
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "network namespaces kc-{}-*: 10.77.{}.0/24 through router namespace {} (host {})",
            self.tag,
            self.subnet,
            self.router,
            self.addr(HOST_OCTET)
        )
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&NodeNet> {
        self.nodes.get(name).ok_or_else(|| anyhow!("no network namespace for node {name}"))
    }

    /// Drops packets from each of `from` to each of `to` (node names); with `both`, also the
    /// other way.
    pub fn cut(&mut self, from: &[String], to: &[String], both: bool) -> anyhow::Result<Cut> {
        let mut cut = Cut::default();
        for a in from {
            for b in to {
                if a == b {
                    continue;
                }
                let mut dirs = vec![(a, b)];
                if both {
                    dirs.push((b, a));
                }
                for (x, y) in dirs {
                    let (ix, iy) = (self.node(x)?.ip.clone(), self.node(y)?.ip.clone());
                    let pref = self.next_pref;
                    self.next_pref += 1;
                    run(&[
                        "ip",
                        "-n",
                        &self.router,
                        "rule",
                        "add",
                        "pref",
                        &pref.to_string(),
                        "from",
                        &ix,
                        "to",
                        &iy,
                        "blackhole",
                    ])?;
                    self.active.push(pref);
                    cut.prefs.push(pref);
                    cut.pairs.push((x.clone(), y.clone()));
                }
            }
        }
        Ok(cut)
    }

    /// Removes the rules of `cut`.
    pub fn heal(&mut self, cut: Cut) -> anyhow::Result<()> {
        let mut first_error = None;
        for pref in cut.prefs {
            match run(&["ip", "-n", &self.router, "rule", "del", "pref", &pref.to_string()]) {
                Ok(_) => self.active.retain(|p| *p != pref),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        remove_tag(&self.tag);
        let _ = std::fs::remove_file(&self.lock);
        lock_live().retain(|(t, _)| *t != self.tag);
    }
}

/// The networks alive in this process: (tag, lock file), for [`remove_all`].
static LIVE: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn lock_live() -> std::sync::MutexGuard<'static, Vec<(String, PathBuf)>> {
    LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes every network this process made (for a runner interrupted by a signal, where no
/// destructor runs).
pub fn remove_all() {
    let live: Vec<(String, PathBuf)> = lock_live().drain(..).collect();
    for (tag, lock) in live {
        remove_tag(&tag);
        let _ = std::fs::remove_file(lock);
    }
}

fn unique_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mut x = (u64::from(std::process::id()) << 20) ^ u64::from(nanos);
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = String::new();
    for _ in 0..5 {
        s.push(char::from(DIGITS[(x % 36) as usize]));
        x /= 36;
    }
    s
}

/// Takes a free `10.77.N.0/24` with a lock file holding `pid tag`.
fn take_subnet(tag: &str) -> anyhow::Result<(u8, PathBuf)> {
    let routes = run(&["ip", "-4", "route", "show"]).unwrap_or_default()
        + &run(&["ip", "-4", "addr", "show"]).unwrap_or_default();
    for n in 1..=250u8 {
        if routes.contains(&format!("10.77.{n}.")) {
            continue;
        }
        let lock = PathBuf::from(LOCK_DIR).join(format!("10.77.{n}.lock"));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(mut f) => {
                use std::io::Write as _;
                writeln!(f, "{} {tag}", std::process::id())?;
                return Ok((n, lock));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(anyhow!(e).context(format!("creating {}", lock.display()))),
        }
    }
    bail!("no free subnet 10.77.N.0/24 (N in 1..=250) for the network namespaces")
}

/// Removes what runners that died left behind: lock files naming a pid that no longer runs.
fn clean_stale() {
    let Ok(entries) = std::fs::read_dir(LOCK_DIR) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let mut words = text.split_whitespace();
        let (Some(pid), Some(tag)) = (words.next(), words.next()) else { continue };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("chaos: removing the network of a run that died (pid {pid}, tag {tag})");
        remove_tag(tag);
        let _ = std::fs::remove_file(&path);
    }
}

/// Kills the processes in the namespaces of `tag` (they were started by the run that owns
/// them), then deletes the namespaces and the host link.
fn remove_tag(tag: &str) {
    let prefix = format!("kc-{tag}-");
    let names: Vec<String> = run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    for ns in &names {
        for pid in run(&["ip", "netns", "pids", ns]).unwrap_or_default().split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).stderr(Stdio::null()).status();
        }
    }
    for ns in &names {
        let _ = run(&["ip", "netns", "del", ns]);
    }
    let _ = Command::new("ip").args(["link", "del", &format!("kc{tag}h")]).stderr(Stdio::null()).status();
}

//! Anchors: every checkpoint (once committed) and every export head also goes where the
//! server's operator cannot rewrite it, one line each: the same JSON as in an export
//! (`{"checkpoint":...}` / `{"head":...}`).
//!
//! - `file:PATH`: appended (O_APPEND) and synced line by line; meant for an append-only
//!   file or another host's mount (`chattr +a`, a WORM share).
//! - `syslog` (= `syslog:unix:/dev/log`), `syslog:unix:PATH`, `syslog:udp:HOST:PORT`,
//!   `syslog:tcp:HOST:PORT`: one RFC 5424 message (facility log audit, severity notice,
//!   APP-NAME `kms-server`, MSGID `audit`), so journald and a central log server receive it;
//!   over TCP framed by octet counting (RFC 6587).
//!
//! An anchor that cannot be written is logged and counted
//! (`kluis_audit_anchor_failures_total`); it does not stop issuance.

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a syslog TCP connection or write may take.
const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 5424 PRI: facility 13 (log audit) * 8 + severity 5 (notice).
const PRI: u8 = 13 * 8 + 5;

/// One place anchors go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnchorTarget {
    File(PathBuf),
    SyslogUnix(PathBuf),
    SyslogUdp(String),
    SyslogTcp(String),
}

/// An `[audit] anchors` entry that is not one of the forms.
#[derive(Debug, thiserror::Error)]
#[error("[audit] anchors: {spec:?} is not file:PATH, syslog, syslog:unix:PATH, syslog:udp:HOST:PORT or syslog:tcp:HOST:PORT")]
pub struct BadAnchor {
    pub spec: String,
}

impl FromStr for AnchorTarget {
    type Err = BadAnchor;

    fn from_str(spec: &str) -> Result<Self, BadAnchor> {
        let bad = || BadAnchor { spec: spec.to_owned() };
        let host_port = |s: &str| if s.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) { Ok(s.to_owned()) } else { Err(bad()) };
        match spec.split_once(':') {
            None if spec == "syslog" => Ok(Self::SyslogUnix("/dev/log".into())),
            Some(("file", p)) if !p.is_empty() => Ok(Self::File(p.into())),
            Some(("syslog", rest)) => match rest.split_once(':') {
                Some(("unix", p)) if !p.is_empty() => Ok(Self::SyslogUnix(p.into())),
                Some(("udp", hp)) => Ok(Self::SyslogUdp(host_port(hp)?)),
                Some(("tcp", hp)) => Ok(Self::SyslogTcp(host_port(hp)?)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for AnchorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::SyslogUnix(p) => write!(f, "syslog:unix:{}", p.display()),
            Self::SyslogUdp(a) => write!(f, "syslog:udp:{a}"),
            Self::SyslogTcp(a) => write!(f, "syslog:tcp:{a}"),
        }
    }
}

/// Writes anchors to every configured target.
pub struct Anchors {
    targets: Vec<AnchorTarget>,
    hostname: String,
    failures: Arc<AtomicU64>,
}

impl Anchors {
    /// Anchors to `targets`; failures are counted in `failures`.
    pub fn new(targets: Vec<AnchorTarget>, failures: Arc<AtomicU64>) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().chars().filter(|c| c.is_ascii_graphic()).take(255).collect::<String>())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "-".into());
        Self { targets, hostname, failures }
    }

    /// Writes `line` (one export line) to every target; a failure is logged and counted.
    pub fn anchor(&self, line: &str) {
        for t in &self.targets {
            if let Err(e) = self.write(t, line) {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(anchor = %t, error = %e, "audit anchor could not be written");
            }
        }
    }

    fn syslog_message(&self, line: &str) -> String {
        let now = time::OffsetDateTime::now_utc();
        let ts = super::format_millis(i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)).unwrap_or_else(|| "-".into());
        format!("<{PRI}>1 {ts} {} kms-server {} audit - {line}", self.hostname, std::process::id())
    }

    fn write(&self, t: &AnchorTarget, line: &str) -> std::io::Result<()> {
        match t {
            AnchorTarget::File(path) => {
                let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            }
            AnchorTarget::SyslogUnix(path) => {
                let s = std::os::unix::net::UnixDatagram::unbound()?;
                s.send_to(self.syslog_message(line).as_bytes(), path).map(drop)
            }
            AnchorTarget::SyslogUdp(addr) => {
                let s = std::net::UdpSocket::bind(if addr.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" })?;
                s.send_to(self.syslog_message(line).as_bytes(), addr.as_str()).map(drop)
            }
            AnchorTarget::SyslogTcp(addr) => {
                use std::net::ToSocketAddrs;
                let sa = addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))?;
                let mut s = std::net::TcpStream::connect_timeout(&sa, TCP_TIMEOUT)?;
                s.set_write_timeout(Some(TCP_TIMEOUT))?;
                let msg = self.syslog_message(line);
                s.write_all(format!("{} {msg}", msg.len()).as_bytes())?;
                s.flush()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_specs_parse_or_are_named() {
        assert_eq!("file:/mnt/a/kluis.anchors".parse::<AnchorTarget>().unwrap(), AnchorTarget::File("/mnt/a/kluis.anchors".into()));
        assert_eq!("syslog".parse::<AnchorTarget>().unwrap(), AnchorTarget::SyslogUnix("/dev/log".into()));
        assert_eq!("syslog:udp:10.0.0.5:514".parse::<AnchorTarget>().unwrap(), AnchorTarget::SyslogUdp("10.0.0.5:514".into()));
        assert_eq!("syslog:tcp:logs.example:601".parse::<AnchorTarget>().unwrap(), AnchorTarget::SyslogTcp("logs.example:601".into()));
        for bad in ["", "file:", "syslog:udp:host", "syslog:tcp::601", "http://x", "syslog:unix:"] {
            let e = bad.parse::<AnchorTarget>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_file_anchor_appends_lines_and_a_udp_anchor_sends_rfc5424() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("anchors");
        std::fs::write(&file, "earlier\n").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let failures = Arc::new(AtomicU64::new(0));
        let a = Anchors::new(vec![
            AnchorTarget::File(file.clone()),
            AnchorTarget::SyslogUdp(udp.local_addr().unwrap().to_string()),
            AnchorTarget::File(dir.path().join("no/such/dir/anchors")),
        ], failures.clone());
        a.anchor("{\"head\":{}}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "earlier\n{\"head\":{}}\n");
        let mut buf = [0u8; 2048];
        let n = udp.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(msg.starts_with("<109>1 ") && msg.contains(" kms-server ") && msg.ends_with(" audit - {\"head\":{}}"), "{msg}");
        assert_eq!(failures.load(Ordering::Relaxed), 1, "the unwritable file is counted");
    }
}

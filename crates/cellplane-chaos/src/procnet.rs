//! Which local process owns the other end of an accepted TCP connection.
//!
//! Every member of a test cell connects from 127.0.0.1, so a proxy cannot tell
//! them apart by address. Linux can: `/proc/net/tcp` maps the connecting socket
//! (local address = the peer address the proxy sees) to an inode, and
//! `/proc/<pid>/fd` shows which process holds that inode. Only the candidate pids
//! are searched, so the cost is a few hundred `readlink`s per connection, paid
//! once when it is accepted. Same user and network namespace only; elsewhere the
//! answer is `None`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The pid among `candidates` that holds the socket connected from `peer` to
/// `local` (from the acceptor's point of view: `peer` is the remote address of
/// the accepted connection, `local` the address it was accepted on).
pub fn tcp_owner(peer: SocketAddr, local: SocketAddr, candidates: &[u32]) -> Option<u32> {
    let inode = socket_inode(peer, local)?;
    let needle = format!("socket:[{inode}]");
    candidates.iter().copied().find(|pid| {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        dir.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .map(|l| l.as_os_str() == needle.as_str())
                .unwrap_or(false)
        })
    })
}

/// The inode of the IPv4 TCP socket whose local address is `from` and remote
/// address is `to`.
pub fn socket_inode(from: SocketAddr, to: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    find_inode(&table, from, to)
}

fn find_inode(table: &str, from: SocketAddr, to: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 {
            return None;
        }
        (parse_addr(f[1])? == from && parse_addr(f[2])? == to)
            .then(|| f[9].parse().ok())
            .flatten()
            .filter(|inode| *inode != 0)
    })
}

/// `0100007F:1F90` → 127.0.0.1:8080. The kernel prints the address as the
/// native-endian integer of its network-order bytes, the port in plain hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(ip.to_ne_bytes())),
        port,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_table() {
        let le = cfg!(target_endian = "little");
        let local = if le { "0100007F:1F90" } else { "7F000001:1F90" };
        let remote = if le { "0100007F:0050" } else { "7F000001:0050" };
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: {local} {remote} 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 20 4 30 10 -1\n"
        );
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(find_inode(&table, a, b), Some(4242));
        assert_eq!(find_inode(&table, b, a), None);
    }

    #[test]
    fn finds_this_process_as_the_owner_of_its_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let me = std::process::id();
        assert_eq!(tcp_owner(peer, local, &[me]), Some(me));
        // Not held by a process that is not a candidate.
        assert_eq!(tcp_owner(peer, local, &[]), None);
    }
}

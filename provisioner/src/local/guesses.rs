//! Slows down guessing instance ids on the local listener. An id is 7
//! characters (≈5.7·10¹⁰ of them); a client asking for ids that do not exist
//! is counted, per address (an IPv6 client per /64), in fixed windows. Past the
//! limit, every instance path answers 429 for that client until its window
//! ends, known ids too: otherwise a 429 for unknown ids and anything else for
//! known ones would still tell a guesser which ids exist.
//!
//! Memory is bounded: at most [`MAX_CLIENTS`] addresses are tracked; past that,
//! the expired ones are dropped, and if the table is still full it starts over
//! (a flood from that many addresses is beyond what one listener can stop).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once.
pub const MAX_CLIENTS: usize = 65_536;

/// Unknown-id requests per client, per window.
#[derive(Debug)]
pub struct Guesses {
    limit: u32,
    window: Duration,
    clients: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Guesses {
    /// At most `limit` unknown ids per `window` per client.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            clients: Mutex::default(),
        }
    }

    /// The client's key: its address, an IPv6 one cut to its /64.
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
            v4 => v4,
        }
    }

    /// How long `ip` must wait, if it is over the limit now.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let clients = self.clients.lock().expect("guesses lock");
        let (start, count) = clients.get(&Self::key(ip))?;
        let ends = *start + self.window;
        (*count > self.limit && now < ends).then(|| ends - now)
    }

    /// Counts one unknown id asked for by `ip`; how long it must wait when
    /// that one was over the limit.
    pub fn miss(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut clients = self.clients.lock().expect("guesses lock");
        if clients.len() >= MAX_CLIENTS {
            clients.retain(|_, (start, _)| now < *start + self.window);
            if clients.len() >= MAX_CLIENTS {
                clients.clear();
            }
        }
        let entry = clients.entry(Self::key(ip)).or_insert((now, 0));
        if now >= entry.0 + self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let ends = entry.0 + self.window;
        (entry.1 > self.limit).then(|| ends - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_limit_a_client_waits_for_its_window() {
        let g = Guesses::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..3 {
            assert_eq!(g.miss(a, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(g.blocked(a, t0 + Duration::from_secs(3)), None);
        assert_eq!(
            g.miss(a, t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(
            g.blocked(a, t0 + Duration::from_secs(20)),
            Some(Duration::from_secs(40))
        );
        // others are not affected
        assert_eq!(g.blocked(b, t0 + Duration::from_secs(20)), None);
        assert_eq!(g.miss(b, t0 + Duration::from_secs(20)), None);
        // a new window starts afresh
        assert_eq!(g.blocked(a, t0 + Duration::from_secs(60)), None);
        assert_eq!(g.miss(a, t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let g = Guesses::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(g.miss("2001:db8:1:2::1".parse().unwrap(), t0), None);
        assert!(
            g.miss("2001:db8:1:2:ffff::9".parse().unwrap(), t0)
                .is_some()
        );
        assert_eq!(g.miss("2001:db8:1:3::1".parse().unwrap(), t0), None);
        // an IPv4-mapped address is the IPv4 client
        assert_eq!(g.miss("198.51.100.7".parse().unwrap(), t0), None);
        assert!(g.miss("::ffff:198.51.100.7".parse().unwrap(), t0).is_some());
    }

    #[test]
    fn the_table_stays_bounded() {
        let g = Guesses::new(5, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            g.miss(IpAddr::V4(i.into()), t0);
        }
        assert!(g.clients.lock().unwrap().len() <= MAX_CLIENTS);
    }
}

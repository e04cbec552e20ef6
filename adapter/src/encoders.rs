//! Bounds the memory that compressing responses takes, whatever the number of
//! connections. A zstd or brotli encoder keeps a window of MiBs; gzip's is 32
//! KiB. So at most `max / 8` (at least one) responses are encoded with zstd or
//! brotli at once, at most `max` in all: past the first bound a response gets
//! gzip (or deflate) if the client accepts it, past the second it is sent
//! as it is. A burst of compressed bundle requests then costs a bounded
//! amount of memory instead of one window per connection; each shed response
//! is counted.

use crate::coding::{Coding, negotiate_among};
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One encoder running: held by the response body until it ends.
#[derive(Debug)]
pub struct Slot {
    _heavy: Option<OwnedSemaphorePermit>,
    _any: Option<OwnedSemaphorePermit>,
}

impl Slot {
    /// An encoder outside the bound, for what is bounded otherwise: the
    /// static cache's fills (a few at a time, see [`crate::static_cache`]).
    pub fn outside_the_bound() -> Self {
        Slot {
            _heavy: None,
            _any: None,
        }
    }
}

/// The encoder slots of one adapter.
#[derive(Debug)]
pub struct Encoders {
    heavy: Arc<Semaphore>,
    any: Arc<Semaphore>,
    /// Responses given a lighter coding than they asked for.
    shed_to_light: Counter,
    /// Responses sent uncompressed for want of a slot.
    shed_to_identity: Counter,
}

impl Encoders {
    /// At most `max` encoders, `max / 8` (at least one) of them zstd or brotli.
    pub fn new(max: usize, shed_to_light: Counter, shed_to_identity: Counter) -> Self {
        let max = max.max(1);
        Self {
            heavy: Arc::new(Semaphore::new((max / 8).max(1))),
            any: Arc::new(Semaphore::new(max)),
            shed_to_light,
            shed_to_identity,
        }
    }

    /// The coding to send with and its slot: `wanted` if a slot is free, else
    /// a light coding the client also accepts, else none (identity).
    pub fn pick(&self, wanted: Coding, accept: Option<&HeaderValue>) -> Option<(Coding, Slot)> {
        let Ok(any) = Arc::clone(&self.any).try_acquire_owned() else {
            self.shed_to_identity.inc();
            return None;
        };
        if !wanted.is_heavy() {
            return Some((
                wanted,
                Slot {
                    _heavy: None,
                    _any: Some(any),
                },
            ));
        }
        if let Ok(heavy) = Arc::clone(&self.heavy).try_acquire_owned() {
            return Some((
                wanted,
                Slot {
                    _heavy: Some(heavy),
                    _any: Some(any),
                },
            ));
        }
        match negotiate_among(accept, &[Coding::Gzip, Coding::Deflate]) {
            Some(light) => {
                self.shed_to_light.inc();
                Some((
                    light,
                    Slot {
                        _heavy: None,
                        _any: Some(any),
                    },
                ))
            }
            None => {
                self.shed_to_identity.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_encoders_are_few_and_the_rest_degrade() {
        let (light, identity) = (Counter::default(), Counter::default());
        let e = Encoders::new(16, light.clone(), identity.clone());
        let all = HeaderValue::from_static("br, gzip, zstd");
        let br_only = HeaderValue::from_static("br");
        let (c1, s1) = e.pick(Coding::Zstd, Some(&all)).unwrap();
        let (c2, s2) = e.pick(Coding::Zstd, Some(&all)).unwrap();
        assert_eq!(
            (c1, c2),
            (Coding::Zstd, Coding::Zstd),
            "16 / 8 = 2 heavy slots"
        );
        let (c3, _s3) = e.pick(Coding::Zstd, Some(&all)).unwrap();
        assert_eq!(c3, Coding::Gzip, "a third gets gzip");
        assert!(
            e.pick(Coding::Brotli, Some(&br_only)).is_none(),
            "no light coding accepted"
        );
        assert_eq!((light.get(), identity.get()), (1, 1));
        drop((s1, s2));
        assert_eq!(
            e.pick(Coding::Brotli, Some(&all)).unwrap().0,
            Coding::Brotli
        );
        // past `max` in all: identity
        let held: Vec<_> = (0..16)
            .filter_map(|_| e.pick(Coding::Gzip, Some(&all)))
            .collect();
        assert_eq!(held.len(), 15, "16 slots, the third pick's still in use");
        assert!(e.pick(Coding::Gzip, Some(&all)).is_none());
    }
}

//! A small log-linear latency histogram (HDR-style) in microseconds.
//!
//! Fixed memory (a few thousand counters) whatever the number of samples:
//! values below 128 are exact, larger values fall into buckets of 64 per
//! power of two, so a reported percentile is within 1/64 (1.6 %) of the truth.

/// Values below this are recorded exactly.
const LINEAR: u64 = 128;
/// Sub-buckets per power of two above `LINEAR`.
const SUB: u64 = 64;
/// Powers of two above `LINEAR` (up to 2^64).
const OCTAVES: usize = 58;
const BUCKETS: usize = LINEAR as usize + OCTAVES * SUB as usize;

/// Latency histogram, microseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    // Shift so that the top 7 bits remain: v >> shift lies in [64, 128).
    let shift = 63 - u64::from(v.leading_zeros()) - 6;
    let top = (v >> shift) - SUB;
    (LINEAR + (shift - 1) * SUB + top) as usize
}

/// Largest value that falls into bucket `i` (what a percentile reports).
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let shift = (i - LINEAR) / SUB + 1;
    let top = (i - LINEAR) % SUB + SUB;
    let low = top << shift;
    low.saturating_add((1u64 << shift) - 1)
}

impl Histogram {
    pub fn new() -> Self {
        Self { counts: vec![0; BUCKETS], total: 0, sum: 0, max: 0 }
    }

    pub fn record(&mut self, micros: u64) {
        if let Some(c) = self.counts.get_mut(index(micros)) {
            *c += 1;
        }
        self.total += 1;
        self.sum += u128::from(micros);
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    #[allow(dead_code)] // kluis-loadgen counts its own; kluis-kmipload reads it here
    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.sum as f64 / self.total as f64 }
    }

    /// The value at quantile `q` (0..=1): the upper edge of the bucket holding
    /// the ceil(q * n)-th smallest sample, capped at the largest sample seen.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values() {
        for v in (0..200_000u64).chain([1 << 40, u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            assert!(upper(i) >= v, "{v}: upper {}", upper(i));
            if i > 0 {
                assert!(upper(i - 1) < v, "{v}: previous bucket upper {}", upper(i - 1));
            }
        }
    }

    #[test]
    fn relative_error_is_small() {
        for v in [128u64, 1000, 12_345, 987_654, 25_000_000] {
            let u = upper(index(v));
            assert!((u - v) as f64 / v as f64 <= 1.0 / 64.0, "{v} -> {u}");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5);
        assert!((495..=510).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((985..=1000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1000);
        assert_eq!(h.max(), 1000);
        let mut g = Histogram::new();
        g.record(5000);
        h.merge(&g);
        assert_eq!(h.count(), 1001);
        assert_eq!(h.quantile(1.0), 5000);
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }
}

package bench

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Latencies are recorded in microseconds in a log-linear histogram: exact
// below 256 µs, then 128 buckets per power of two (under 0.8 % error). A
// client process records into one Histogram from every reader goroutine;
// the driver merges the processes' sparse copies.
const (
	subBits  = 7
	subCount = 1 << subBits
	nBuckets = (64 - subBits) * subCount
)

func bucketOf(us uint64) int {
	if us < 2*subCount {
		return int(us)
	}
	shift := bits.Len64(us) - subBits - 1
	return shift*subCount + int(us>>shift)
}

// bucketRange is the bucket's lowest value and its width, in microseconds.
func bucketRange(i int) (low, width uint64) {
	if i < 2*subCount {
		return uint64(i), 1
	}
	shift := i/subCount - 1
	return uint64(i%subCount+subCount) << shift, 1 << shift
}

// Histogram counts latencies; Record is safe for concurrent use.
type Histogram struct {
	counts [nBuckets]atomic.Uint64
	max    atomic.Int64 // nanoseconds
}

// Record adds one latency. Negative values (clock steps) count as zero.
func (h *Histogram) Record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d/time.Microsecond))].Add(1)
	for {
		m := h.max.Load()
		if int64(d) <= m || h.max.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

// Snapshot is a histogram in a form that travels as JSON and merges.
type Snapshot struct {
	Buckets map[int]uint64 `json:"buckets"`
	Max     time.Duration  `json:"max"`
}

// Snapshot copies the non-empty buckets.
func (h *Histogram) Snapshot() Snapshot {
	s := Snapshot{Buckets: map[int]uint64{}, Max: time.Duration(h.max.Load())}
	for i := range h.counts {
		if n := h.counts[i].Load(); n > 0 {
			s.Buckets[i] = n
		}
	}
	return s
}

// Merge adds o into s.
func (s *Snapshot) Merge(o Snapshot) {
	if s.Buckets == nil {
		s.Buckets = map[int]uint64{}
	}
	for i, n := range o.Buckets {
		s.Buckets[i] += n
	}
	s.Max = max(s.Max, o.Max)
}

// Count is how many latencies were recorded.
func (s Snapshot) Count() uint64 {
	var n uint64
	for _, c := range s.Buckets {
		n += c
	}
	return n
}

// Quantile is the latency at quantile q (0 < q <= 1): the middle of the
// bucket holding the ceil(q*n)-th smallest value, capped at the exact max.
func (s Snapshot) Quantile(q float64) time.Duration {
	n := s.Count()
	if n == 0 {
		return 0
	}
	rank := uint64(q * float64(n))
	if float64(rank) < q*float64(n) {
		rank++
	}
	rank = max(rank, 1)
	var seen uint64
	for i := range nBuckets {
		seen += s.Buckets[i]
		if seen >= rank {
			low, width := bucketRange(i)
			d := time.Duration(low)*time.Microsecond + time.Duration(width)*time.Microsecond/2
			return min(d, s.Max)
		}
	}
	return s.Max
}

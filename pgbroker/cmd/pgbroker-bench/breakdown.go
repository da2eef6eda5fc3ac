package main

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// breakdownPool, set by -breakdown, queries the server for the labels of
// its processes and its functions' times.
var breakdownPool *pgxpool.Pool

// pidTicks is the CPU time (user and system), in clock ticks, of each of
// the server's processes, read from /proc (Linux).
func pidTicks() map[int]int64 {
	out := map[int]int64{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ... utime(14) stime(15): fields after the ")".
		rest := string(stat[strings.LastIndexByte(string(stat), ')')+2:])
		f := strings.Fields(rest)
		if len(f) < 13 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		if pid != postmaster && ppid != postmaster {
			continue
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		out[pid] = ut + st
	}
	return out
}

// printBreakdown prints the CPU each server process used between before
// and after, per publish (n of them), summed by label: the node whose
// pool opened the connection, the backend's type and its last query
// (a pooled connection runs several; its last one names it). Then the
// functions' calls and times since the schema was created (wall time in
// the function: CPU, and waits for locks and for the other core).
func printBreakdown(before, after map[int]int64, fbefore map[string]funcStat, n int64) {
	labels := map[int]string{}
	rows, err := breakdownPool.Query(context.Background(), `SELECT pid, coalesce(application_name,''), backend_type, left(regexp_replace(query, '\s+', ' ', 'g'), 60) FROM pg_stat_activity`)
	if err == nil {
		for rows.Next() {
			var pid int
			var app, bt, q string
			rows.Scan(&pid, &app, &bt, &q)
			labels[pid] = app + " | " + bt + " | " + q
		}
		rows.Close()
	}
	fafter := funcStats()
	for _, name := range slices.Sorted(maps.Keys(fafter)) {
		d := fafter[name].minus(fbefore[name])
		if d.calls == 0 {
			continue
		}
		fmt.Printf("    function %s: %d calls (%.3f per publish), %.1f µs per publish in it, %.1f in itself\n",
			name, d.calls, float64(d.calls)/float64(n), d.total*1e3/float64(n), d.self*1e3/float64(n))
	}
	type kv struct {
		l string
		t int64
	}
	agg := map[string]int64{}
	for pid, t := range after {
		d := t - before[pid]
		if d == 0 {
			continue
		}
		l, ok := labels[pid]
		if !ok {
			l = "(gone or aux) " + strconv.Itoa(pid)
		}
		agg[l] += d
	}
	var all []kv
	for l, t := range agg {
		all = append(all, kv{l, t})
	}
	slices.SortFunc(all, func(x, y kv) int { return cmp.Compare(y.t, x.t) })
	for _, x := range all {
		fmt.Printf("    %7.1f µs/publish  %s\n", float64(time.Duration(x.t)*time.Second/clockTicks)/float64(n)/1e3, x.l)
	}
}

// funcStat is a function's line of pg_stat_user_functions (times in ms).
type funcStat struct {
	calls       int64
	total, self float64
}

func (f funcStat) minus(g funcStat) funcStat {
	return funcStat{f.calls - g.calls, f.total - g.total, f.self - g.self}
}

// funcStats reads every function's calls and times so far. The server
// counts a backend's calls when its transaction ends, up to a second
// late.
func funcStats() map[string]funcStat {
	out := map[string]funcStat{}
	rows, err := breakdownPool.Query(context.Background(), `SELECT schemaname||'.'||funcname, calls, total_time, self_time FROM pg_stat_user_functions`)
	if err != nil {
		return out
	}
	defer rows.Close()
	for rows.Next() {
		var name string
		var f funcStat
		if rows.Scan(&name, &f.calls, &f.total, &f.self) == nil {
			out[name] = f
		}
	}
	return out
}

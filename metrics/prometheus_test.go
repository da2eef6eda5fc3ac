package metrics_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/roomcast/pubsub/metrics"
	"github.com/roomcast/pubsub/protocol"
	"github.com/roomcast/pubsub/pubsubtest"
)

// promServer is a real Prometheus server, scraping one target every
// second, in a directory of the test's.
type promServer struct {
	t      *testing.T
	url    string
	client *http.Client
}

// startPrometheus starts the prometheus binary on a free loopback port,
// scraping target (host:port, path /metrics) as job "roomcast", and waits
// until it is ready. It is stopped at the test's cleanup. The test is
// skipped when there is no prometheus in PATH (apt-get install prometheus).
func startPrometheus(t *testing.T, target string) *promServer {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("no prometheus in PATH (apt-get install prometheus): the dashboard's queries are not run on a real Prometheus")
	}
	dir := t.TempDir()
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: roomcast
    static_configs:
      - targets: [%q]
`, target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	logf, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin,
		"--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--log.level=warn")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	p := &promServer{t: t, url: "http://" + addr, client: &http.Client{Timeout: 5 * time.Second}}
	t.Cleanup(func() {
		p.client.CloseIdleConnections()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logf.Close()
		if t.Failed() {
			log, _ := os.ReadFile(logf.Name())
			t.Logf("prometheus log:\n%s", log)
		}
	})
	p.poll("Prometheus ready", func() (bool, error) {
		resp, err := p.client.Get(p.url + "/-/ready")
		if err != nil {
			return false, nil // starting
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	return p
}

// poll calls cond every 200ms until it holds or fails, for at most a
// minute: a process starting and scraping on its own schedule sends no
// event to wait on.
func (p *promServer) poll(what string, cond func() (bool, error)) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil {
			p.t.Fatalf("%s: %v", what, err)
		}
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			p.t.Fatalf("timed out after a minute waiting for %s", what)
		case <-tick.C:
		}
	}
}

// apiResult is an answer of Prometheus' HTTP API.
type apiResult struct {
	Status    string          `json:"status"`
	Error     string          `json:"error"`
	ErrorType string          `json:"errorType"`
	Data      json.RawMessage `json:"data"`
}

// api calls a GET endpoint of the HTTP API. A query Prometheus rejects
// (bad PromQL) is an error; an empty answer is not.
func (p *promServer) api(path string, params url.Values) (json.RawMessage, error) {
	resp, err := p.client.Get(p.url + path + "?" + params.Encode())
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r apiResult
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: HTTP %d %q", path, resp.StatusCode, b)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s %v: %s: %s", path, params, r.ErrorType, r.Error)
	}
	return r.Data, nil
}

// results counts the series an instant query returns.
func (p *promServer) results(expr string) (int, error) {
	data, err := p.api("/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return 0, err
	}
	var v struct {
		Result []json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return 0, err
	}
	return len(v.Result), nil
}

// labelValues answers a template variable's label_values(selector, label)
// as Grafana asks it.
func (p *promServer) labelValues(selector, label string) ([]string, error) {
	data, err := p.api("/api/v1/label/"+label+"/values", url.Values{"match[]": {selector}})
	if err != nil {
		return nil, err
	}
	var values []string
	return values, json.Unmarshal(data, &values)
}

// TestTheDashboardsQueriesAnswerOnARealPrometheus serves a Handler's
// metrics to a real Prometheus, then runs every query of dashboard.json
// the way Grafana would, its variables filled in: each must parse and
// return data. It is what "import the dashboard and it works" means,
// short of a Grafana.
func TestTheDashboardsQueriesAnswerOnARealPrometheus(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	e := serveMetrics(t, metrics.NewCollector(srv.Handler, metrics.WithRooms("lobby")))
	u, err := url.Parse(e.url)
	if err != nil {
		t.Fatal(err)
	}
	prom := startPrometheus(t, u.Host)

	lobby := srv.DialRaw("/ws?room=lobby")
	srv.Publish("lobby", []byte("hi"))
	lobby.ExpectText("hi")
	kicked := srv.Dial("/ws")
	if err := srv.Disconnect(kicked.Welcome.ConnID, "kicked"); err != nil {
		t.Fatal(err)
	}
	kicked.ExpectClose(protocol.CloseDisconnected)
	e.waitFor("the kick counted", func(s scrape) bool {
		return s.is(1, "roomcast_connections_closed_total", "code", "4003", "reason", "disconnected")
	})

	// Three scrapes of these values: enough for rate over 4 seconds.
	prom.poll("three scrapes of the kick", func() (bool, error) {
		n, err := prom.results(`count_over_time(roomcast_connections_closed_total{code="4003"}[10s]) >= 3`)
		return n == 1, err
	})

	fill := strings.NewReplacer(
		"$job", "roomcast",
		"$instance", strings.ReplaceAll(u.Host, ".", `\\.`),
		"$room", "lobby",
		"$__rate_interval", "4s",
		"$__range", "1m",
		"$__interval", "1s")
	for _, q := range loadDashboard(t).queries() {
		expr := fill.Replace(q.expr)
		if rest, ok := strings.CutPrefix(expr, "label_values("); ok {
			i := strings.LastIndex(rest, ",")
			selector, label := rest[:i], strings.TrimSpace(strings.TrimSuffix(rest[i+1:], ")"))
			values, err := prom.labelValues(selector, label)
			if err != nil || len(values) == 0 {
				t.Errorf("%s: %s: values %q, %v; want some", q.where, expr, values, err)
			}
			continue
		}
		n, err := prom.results(expr)
		if err != nil || n == 0 {
			t.Errorf("%s: %s: %d series, %v; want some", q.where, expr, n, err)
		}
	}
}

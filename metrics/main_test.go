package metrics_test

import (
	"fmt"
	"mime"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/roomcast/pubsub/pubsubtest"
)

// TestMain fails the run when goroutines outlive the tests.
func TestMain(m *testing.M) { pubsubtest.Main(m) }

// endpoint is a /metrics endpoint served on a loopback port, as a host
// serves it: promhttp over a registry holding the collector.
type endpoint struct {
	t      testing.TB
	url    string
	client *http.Client
}

// serveMetrics serves c at /metrics through promhttp, from a pedantic
// registry (which also checks that every metric matches a description),
// until the test's cleanup.
func serveMetrics(t testing.TB, c prometheus.Collector) *endpoint {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatalf("register: %v", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := httptest.NewServer(mux)
	client := &http.Client{Timeout: pubsubtest.Timeout}
	t.Cleanup(func() {
		client.CloseIdleConnections()
		srv.Close()
	})
	return &endpoint{t: t, url: srv.URL + "/metrics", client: client}
}

// scrape is one scrape: the metric families by name.
type scrape map[string]*dto.MetricFamily

// get scrapes the endpoint over HTTP, as Prometheus does, and parses the
// text exposition format; it fails the test on anything but a 200.
func (e *endpoint) get() scrape {
	e.t.Helper()
	s, status, err := e.tryGet()
	if err != nil {
		e.t.Fatal(err)
	}
	if status != http.StatusOK {
		e.t.Fatalf("GET %s: HTTP %d", e.url, status)
	}
	return s
}

func (e *endpoint) tryGet() (scrape, int, error) {
	req, err := http.NewRequest(http.MethodGet, e.url, nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, 0, fmt.Errorf("GET %s: %w", e.url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, resp.StatusCode, nil
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/plain" {
		return nil, resp.StatusCode, fmt.Errorf("GET %s: Content-Type %q, want text/plain", e.url, resp.Header.Get("Content-Type"))
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, resp.StatusCode, fmt.Errorf("parse the scrape: %w", err)
	}
	return scrape(fams), resp.StatusCode, nil
}

// waitFor scrapes until cond holds of a scrape, and returns that scrape:
// the Handler counts a connection's end after the client saw its close,
// so a test waits for the counter, never sleeps.
func (e *endpoint) waitFor(what string, cond func(scrape) bool) scrape {
	e.t.Helper()
	var last scrape
	pubsubtest.WaitFor(e.t, what, func() bool {
		s, status, err := e.tryGet()
		if err != nil || status != http.StatusOK {
			return false
		}
		last = s
		return cond(s)
	})
	return last
}

// value is the value of the series of name with exactly labels (name,
// value pairs), and whether it is there.
func (s scrape) value(name string, labels ...string) (float64, bool) {
	m := s.series(name, labels...)
	if m == nil {
		return 0, false
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue(), true
	case m.Gauge != nil:
		return m.Gauge.GetValue(), true
	}
	return 0, false
}

func (s scrape) series(name string, labels ...string) *dto.Metric {
	f := s[name]
	if f == nil {
		return nil
	}
	for _, m := range f.Metric {
		if labelsAre(m, labels) {
			return m
		}
	}
	return nil
}

func labelsAre(m *dto.Metric, labels []string) bool {
	if len(m.Label) != len(labels)/2 {
		return false
	}
	for i := 0; i < len(labels); i += 2 {
		if !slices.ContainsFunc(m.Label, func(l *dto.LabelPair) bool {
			return l.GetName() == labels[i] && l.GetValue() == labels[i+1]
		}) {
			return false
		}
	}
	return true
}

// is reports whether the series has value want.
func (s scrape) is(want float64, name string, labels ...string) bool {
	v, ok := s.value(name, labels...)
	return ok && v == want
}

// mustBe fails the test unless the series has value want.
func (s scrape) mustBe(t testing.TB, want float64, name string, labels ...string) {
	t.Helper()
	v, ok := s.value(name, labels...)
	if !ok {
		t.Fatalf("%s%s: no such series in the scrape", name, fmtLabels(labels))
	}
	if v != want {
		t.Fatalf("%s%s = %v, want %v", name, fmtLabels(labels), v, want)
	}
}

// labelValues lists the values label takes in family name.
func (s scrape) labelValues(name, label string) []string {
	var out []string
	if f := s[name]; f != nil {
		for _, m := range f.Metric {
			for _, l := range m.Label {
				if l.GetName() == label {
					out = append(out, l.GetValue())
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// roomcastFamilies lists the families of the scrape whose names start
// with prefix, sorted.
func (s scrape) families(prefix string) []string {
	var out []string
	for name := range s {
		if strings.HasPrefix(name, prefix) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

func fmtLabels(labels []string) string {
	if len(labels) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("{")
	for i := 0; i < len(labels); i += 2 {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "%s=%q", labels[i], labels[i+1])
	}
	b.WriteString("}")
	return b.String()
}

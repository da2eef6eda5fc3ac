package metrics_test

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/roomcast/pubsub/metrics"
	"github.com/roomcast/pubsub/pubsubtest"
)

// dashboard is the part of a Grafana dashboard these tests read.
type dashboard struct {
	UID           string  `json:"uid"`
	Title         string  `json:"title"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int                      `json:"id"`
	Type       string                   `json:"type"`
	Title      string                   `json:"title"`
	Datasource *datasource              `json:"datasource"`
	GridPos    struct{ X, Y, W, H int } `json:"gridPos"`
	Targets    []struct {
		Datasource   *datasource `json:"datasource"`
		Expr         string      `json:"expr"`
		LegendFormat string      `json:"legendFormat"`
		RefID        string      `json:"refId"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a row's
}

type datasource struct{ Type, UID string }

// query is one PromQL query of the dashboard, with where it is.
type query struct {
	where, expr, legend string
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile("dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("dashboard.json: %v", err)
	}
	return d
}

// queries lists every query of the dashboard: the panels' (rows'
// panels included) and the template variables'.
func (d dashboard) queries() []query {
	var out []query
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				out = append(out, query{"panel " + p.Title + " " + tg.RefID, tg.Expr, tg.LegendFormat})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(map[string]any); ok {
			out = append(out, query{"variable " + v.Name, q["query"].(string), ""})
		}
	}
	return out
}

var (
	metricName = regexp.MustCompile(`\broomcast_[a-zA-Z0-9_]+`)
	byClause   = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	matchers   = regexp.MustCompile(`\{([^}]*)\}`)
	matcher    = regexp.MustCompile(`^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	legendVar  = regexp.MustCompile(`\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)
	variable   = regexp.MustCompile(`\$(\w+)`)
)

// labelsOf lists the labels a query names: in by and without clauses, in
// label matchers, and in its legend. label_values(m, l) names l as well.
func (q query) labels() []string {
	var out []string
	for _, m := range byClause.FindAllStringSubmatch(q.expr, -1) {
		for l := range strings.SplitSeq(m[1], ",") {
			out = append(out, strings.TrimSpace(l))
		}
	}
	for _, m := range matchers.FindAllStringSubmatch(q.expr, -1) {
		for part := range strings.SplitSeq(m[1], ",") {
			if mm := matcher.FindStringSubmatch(part); mm != nil {
				out = append(out, mm[1])
			}
		}
	}
	for _, m := range legendVar.FindAllStringSubmatch(q.legend, -1) {
		out = append(out, m[1])
	}
	if rest, ok := strings.CutPrefix(q.expr, "label_values("); ok {
		if i := strings.LastIndex(rest, ","); i >= 0 {
			out = append(out, strings.TrimSpace(strings.TrimSuffix(rest[i+1:], ")")))
		}
	}
	return out
}

// targetLabels are the labels Prometheus adds to every series it scrapes.
var targetLabels = []string{"job", "instance"}

// TestTheDashboardQueriesWhatAScrapeExports checks dashboard.json against
// a real scrape, both ways: every metric it queries is exported, every
// exported metric has a panel, and every label it names (in a matcher, a
// by clause, a legend) is one of the metric's or one Prometheus adds. A
// renamed metric or label fails here, not on an operator's screen.
func TestTheDashboardQueriesWhatAScrapeExports(t *testing.T) {
	t.Parallel()
	srv := pubsubtest.Start(t)
	srv.DialRaw("/ws?room=lobby")
	s := serveMetrics(t, metrics.NewCollector(srv.Handler,
		metrics.WithRooms("lobby"), metrics.WithRoomFilter(func(string) bool { return true }))).get()

	labelsOf := func(name string) []string {
		out := slices.Clone(targetLabels)
		for _, m := range s[name].GetMetric() {
			for _, l := range m.Label {
				out = append(out, l.GetName())
			}
		}
		return out
	}
	queried := map[string]bool{}
	qs := loadDashboard(t).queries()
	if len(qs) == 0 {
		t.Fatal("dashboard.json has no queries")
	}
	for _, q := range qs {
		names := metricName.FindAllString(q.expr, -1)
		if len(names) == 0 {
			t.Errorf("%s: %q queries no roomcast metric", q.where, q.expr)
			continue
		}
		var known []string
		for _, name := range names {
			queried[name] = true
			if _, ok := s[name]; !ok {
				t.Errorf("%s: %s is not in a scrape", q.where, name)
			}
			known = append(known, labelsOf(name)...)
		}
		for _, l := range q.labels() {
			if !slices.Contains(known, l) {
				t.Errorf("%s: label %q is not a label of %v (nor one Prometheus adds)", q.where, l, names)
			}
		}
	}
	for _, name := range s.families("roomcast_") {
		if !queried[name] {
			t.Errorf("%s is exported but no panel of dashboard.json shows it", name)
		}
	}
}

// TestTheDashboardIsWellFormed checks what Grafana needs to import it: a
// uid, unique panel ids, a place on the grid for each panel, every query
// on the data source variable, and only variables it defines.
func TestTheDashboardIsWellFormed(t *testing.T) {
	t.Parallel()
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Fatalf("uid %q, title %q, schemaVersion %d: want all three", d.UID, d.Title, d.SchemaVersion)
	}
	vars := []string{"__rate_interval", "__range", "__interval"} // Grafana's own
	hasDatasource := false
	for _, v := range d.Templating.List {
		vars = append(vars, v.Name)
		if v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus" {
			hasDatasource = true
		}
	}
	if !hasDatasource {
		t.Fatal(`no template variable "datasource" of type datasource, query prometheus: an import would not ask for a data source`)
	}
	want := datasource{"prometheus", "${datasource}"}
	ids := map[int]bool{}
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			if p.ID <= 0 || ids[p.ID] {
				t.Errorf("panel %q: id %d, want a positive id of its own", p.Title, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("panel %q: gridPos %+v, want a place within 24 columns", p.Title, p.GridPos)
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if p.Datasource == nil || *p.Datasource != want || len(p.Targets) == 0 {
				t.Errorf("panel %q: datasource %v and %d queries, want %v and at least one", p.Title, p.Datasource, len(p.Targets), want)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if tg.Datasource == nil || *tg.Datasource != want || tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("panel %q: query %q: datasource %v, refId %q: want %v and a refId of its own", p.Title, tg.Expr, tg.Datasource, tg.RefID, want)
				}
				refs[tg.RefID] = true
			}
		}
	}
	walk(d.Panels)
	for _, q := range d.queries() {
		for _, m := range variable.FindAllStringSubmatch(q.expr, -1) {
			if !slices.Contains(vars, m[1]) {
				t.Errorf("%s: $%s is not a variable of the dashboard", q.where, m[1])
			}
		}
		if strings.Count(q.expr, "(") != strings.Count(q.expr, ")") || strings.Count(q.expr, "{") != strings.Count(q.expr, "}") ||
			strings.Count(q.expr, "[") != strings.Count(q.expr, "]") {
			t.Errorf("%s: unbalanced brackets in %q", q.where, q.expr)
		}
	}
}

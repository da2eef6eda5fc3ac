package protocol_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode"

	"github.com/roomcast/pubsub/protocol"
)

func TestEveryCloseCodeHasAName(t *testing.T) {
	seen := map[protocol.CloseCode]bool{}
	for _, c := range protocol.CloseCodes() {
		if seen[c] {
			t.Fatalf("close code %d listed twice", c)
		}
		seen[c] = true
		if s := c.String(); len(s) <= 5 {
			t.Fatalf("close code %d has no name: %q", c, s)
		}
	}
	if got := protocol.CloseSlowConsumer.String(); got != "4002 slow consumer" {
		t.Fatalf("String() = %q", got)
	}
	if got := protocol.CloseCode(4999).String(); got != "4999" {
		t.Fatalf("an unnamed code: %q, want its number", got)
	}
}

// upperSnake turns a Go constant's name after its prefix into the browser
// client's: CloseGoingAway -> GOING_AWAY.
func upperSnake(name, prefix string) string {
	var b strings.Builder
	for i, r := range strings.TrimPrefix(name, prefix) {
		if i > 0 && unicode.IsUpper(r) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
	}
	return b.String()
}

// jsObject reads the entries of `export const NAME = Object.freeze({...})`
// (roomcast.js) or `export declare const NAME: Readonly<{...}>` (the .d.ts).
func jsObject(t *testing.T, src, name string) map[string]string {
	t.Helper()
	re := regexp.MustCompile(`(?s)export (?:declare )?const ` + name + `(?: = Object\.freeze\(|: Readonly<)\{(.*?)\}`)
	m := re.FindStringSubmatch(src)
	if m == nil {
		t.Fatalf("no %s object in the browser client", name)
	}
	out := map[string]string{}
	for _, e := range regexp.MustCompile(`([A-Z_]+): ("[a-z_]+"|\d+)[,;]`).FindAllStringSubmatch(m[1], -1) {
		out[e[1]] = strings.Trim(e[2], `"`)
	}
	return out
}

// goConstants reads this package's constants from its source: name ->
// value, for the names with prefix.
func goConstants(t *testing.T, prefix string) map[string]string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), "protocol.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, spec := range g.Specs {
			v := spec.(*ast.ValueSpec)
			if len(v.Values) != 1 || !strings.HasPrefix(v.Names[0].Name, prefix) {
				continue
			}
			lit, ok := v.Values[0].(*ast.BasicLit)
			if !ok {
				t.Fatalf("constant %s is not a literal", v.Names[0].Name)
			}
			out[v.Names[0].Name] = strings.Trim(lit.Value, `"`)
		}
	}
	return out
}

// The browser client's CLOSE, ERROR and REASON (in roomcast.js and its
// declarations) are this package's constants, name for name (CloseGoingAway
// is CLOSE.GOING_AWAY) and value for value.
func TestTheBrowserClientSpeaksTheSameVocabulary(t *testing.T) {
	want := map[string]map[string]string{}
	for obj, prefix := range map[string]string{"CLOSE": "Close", "ERROR": "Code", "REASON": "Reason"} {
		consts := goConstants(t, prefix)
		if len(consts) == 0 {
			t.Fatalf("no %s constants", prefix)
		}
		want[obj] = map[string]string{}
		for name, v := range consts {
			want[obj][upperSnake(name, prefix)] = v
		}
	}
	if len(want["CLOSE"]) != len(protocol.CloseCodes()) || len(want["ERROR"]) != len(protocol.ErrorCodes()) ||
		len(want["REASON"]) != len(protocol.Reasons()) {
		t.Fatal("CloseCodes, ErrorCodes or Reasons does not list every constant")
	}
	for _, file := range []string{"../js/roomcast.js", "../js/roomcast.d.ts"} {
		src, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for obj, w := range want {
			if got := jsObject(t, string(src), obj); !maps.Equal(got, w) {
				t.Errorf("%s %s = %v, want %v", file, obj, got, w)
			}
		}
	}
}

// PROTOCOL.md documents every code and reason in its tables.
func TestProtocolMDDocumentsEveryCode(t *testing.T) {
	doc, err := os.ReadFile("../PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range protocol.ErrorCodes() {
		if !strings.Contains(string(doc), "| `"+string(c)+"` |") {
			t.Errorf("PROTOCOL.md has no table row for error code %s", c)
		}
	}
	for _, r := range protocol.Reasons() {
		if !strings.Contains(string(doc), "| `"+string(r)+"` |") {
			t.Errorf("PROTOCOL.md has no table row for reason %s", r)
		}
	}
	for _, c := range protocol.CloseCodes() {
		row := "| " + strconv.Itoa(int(c)) + " |"
		if c == protocol.CloseAbnormal {
			row = "as 1006" // reported, never sent: described below the table
		}
		if !strings.Contains(string(doc), row) {
			t.Errorf("PROTOCOL.md does not document close code %s", c)
		}
	}
}

// Envelope decodes exactly the fields PROTOCOL.md's table of server
// envelopes (section 3.4) names: none is missing, none is invented.
func TestEnvelopeHasEveryFieldOfTheServerEnvelopes(t *testing.T) {
	doc, err := os.ReadFile("../PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(doc), "### 3.4 Server to client")
	section, _, _ = strings.Cut(section, "```")
	documented := map[string]bool{"type": true, "data": true, "text": true, "binary": true} // "one payload field"
	rows := 0
	for line := range strings.SplitSeq(section, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 4 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		rows++
		fields := regexp.MustCompile("for `[a-z]+`").ReplaceAllString(cells[2], "") // the ack's "for `publish` also …"
		for _, m := range regexp.MustCompile("`([a-z_]+)`").FindAllStringSubmatch(fields, -1) {
			documented[m[1]] = true
		}
	}
	if rows < 10 {
		t.Fatalf("read %d rows of section 3.4's table, want its 10 envelope types", rows)
	}
	decoded := map[string]bool{}
	typ := reflect.TypeFor[protocol.Envelope]()
	for i := range typ.NumField() {
		name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		decoded[name] = true
	}
	for f := range documented {
		if !decoded[f] {
			t.Errorf("PROTOCOL.md section 3.4 names the field %q; protocol.Envelope does not decode it", f)
		}
	}
	for f := range decoded {
		if !documented[f] {
			t.Errorf("protocol.Envelope decodes %q, which PROTOCOL.md section 3.4 does not name", f)
		}
	}
}

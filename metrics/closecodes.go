package metrics

import (
	"strconv"
	"strings"

	"github.com/roomcast/pubsub/protocol"
)

// A connection's close code is the server's own or, when the peer closed
// first, whatever the peer sent: RFC 6455 lets a client pick any code from
// 3000 to 4999, so counting raw codes would let clients create series at
// will. The code label therefore takes its values from a fixed set:
//
//   - every code roomcast names (protocol.CloseCodes, PROTOCOL.md section 4);
//   - the other RFC 6455 codes a peer can send: 1002 protocol error, 1005
//     no status received (a close frame with no code, which is what a
//     browser's ws.close() sends), 1010 mandatory extension, 1012 service
//     restart, 1014 bad gateway;
//   - "other", for every code outside the set.
//
// The reason label is the code's fixed name in snake_case ("slow_consumer"),
// never the free-text close reason, so it adds no series of its own.
var closeLabels, closeIndex = closeLabelSet()

// otherCode is the label value of every code outside the fixed set.
const otherCode = "other"

// closeLabel is one pair of values of the code and reason labels.
type closeLabel struct{ code, reason string }

// peerCodes are the RFC 6455 codes a peer can send that roomcast does not
// name itself.
var peerCodes = []struct {
	code protocol.CloseCode
	name string
}{
	{1002, "protocol error"},
	{1005, "no status received"},
	{1010, "mandatory extension"},
	{1012, "service restart"},
	{1014, "bad gateway"},
}

func closeLabelSet() ([]closeLabel, map[protocol.CloseCode]int) {
	var labels []closeLabel
	index := make(map[protocol.CloseCode]int)
	add := func(code protocol.CloseCode, name string) {
		if _, ok := index[code]; ok {
			return
		}
		index[code] = len(labels)
		labels = append(labels, closeLabel{strconv.Itoa(int(code)), strings.ReplaceAll(name, " ", "_")})
	}
	for _, code := range protocol.CloseCodes() {
		add(code, closeName(code))
	}
	for _, p := range peerCodes {
		add(p.code, p.name)
	}
	labels = append(labels, closeLabel{otherCode, otherCode})
	return labels, index
}

// closeName is the name protocol.CloseCode.String gives code ("4002 slow
// consumer" names it "slow consumer"), or "unnamed".
func closeName(code protocol.CloseCode) string {
	name, ok := strings.CutPrefix(code.String(), strconv.Itoa(int(code))+" ")
	if !ok || name == "" {
		return "unnamed"
	}
	return name
}

// closeCounts folds the Handler's counts by code into the fixed set, in
// closeLabels' order.
func closeCounts(closed map[protocol.CloseCode]uint64) []uint64 {
	counts := make([]uint64, len(closeLabels))
	for code, n := range closed {
		i, ok := closeIndex[code]
		if !ok {
			i = len(closeLabels) - 1 // other
		}
		counts[i] += n
	}
	return counts
}

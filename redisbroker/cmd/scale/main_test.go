package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestMain lets the test binary play the node and load processes the
// driver starts as copies of itself.
func TestMain(m *testing.M) {
	var err error
	switch os.Getenv(roleEnv) {
	case "node":
		err = runNode(os.Args[1:])
	case "load":
		err = runLoad(os.Args[1:])
	default:
		os.Exit(m.Run())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

// A small run, with a node killed mid-stream, counts every message and
// finds them all, once each.
func TestAKilledNodesClientsRecoverExactly(t *testing.T) {
	var out, log bytes.Buffer
	err := runDriver([]string{"-rooms", "1x60,3x20,10x3", "-per-load", "50", "-duration", "3s", "-kill-at", "1s",
		"-drain", "30s", "-maxlife", "2m"}, &out, &log)
	if err != nil {
		t.Fatalf("%v\n%s\n%s", err, out.String(), log.String())
	}
	for _, want := range []string{"Exact: every connection", "| doubled | 0 |", "0 holes; 0 connections short", "recovery after the kill"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("the report lacks %q:\n%s", want, out.String())
		}
	}
}

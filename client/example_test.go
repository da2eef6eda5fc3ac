package client_test

import (
	"context"
	"fmt"
	"log"
	"net/http/httptest"
	"strings"
	"time"

	"github.com/roomcast/pubsub"
	"github.com/roomcast/pubsub/client"
)

func Example() {
	// A roomcast server that lets clients publish.
	ps := pubsub.NewHandler(pubsub.WithClientPublish(true))
	srv := httptest.NewServer(ps)
	defer srv.Close()
	defer ps.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	got := make(chan client.Message, 1)
	if _, err := c.Subscribe(ctx, "chat", func(m client.Message) { got <- m }); err != nil {
		log.Fatal(err)
	}
	if _, err := c.Publish(ctx, "chat", []byte(`{"text":"hi"}`)); err != nil {
		log.Fatal(err)
	}
	m := <-got
	fmt.Println(m.Room, m.Seq, m.Kind, string(m.Data))
	// Output: chat 1 json {"text":"hi"}
}

package pgbroker

// NotifyPayloads exports notifyPayloads to the tests.
var NotifyPayloads = notifyPayloads

package natsbroker

// SkipKeyRecords makes b publish keyed messages without writing their key
// records, as a node that dies between the two writes would.
func SkipKeyRecords(b *Broker) { b.skipKeyRecords = true }

// KeyHash is the hash that names a key's record subject.
var KeyHash = keyHash

package remote

import "google.golang.org/grpc"

// Conn is the client's connection, for services beside the REAPI ones
// (e.g. the listing service of snaploader serve); calls on it carry the
// client's credentials.
func (c *Client) Conn() grpc.ClientConnInterface { return c.conn }

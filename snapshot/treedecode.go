package snapshot

import (
	"unicode/utf8"
	"unsafe"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/snaploader/snaploader/cow"
	"github.com/snaploader/snaploader/proto/snapshotpb"
)

// decodeTree decodes and validates the Tree blob b of chunked file name,
// with the result ChunkedFileFromTree gives for it.
//
// A restore decodes the tree of every chunked file before it is ready, and
// a 64 GiB guest's tree lists 16,777 chunks, so the trees snaploader writes
// are read in one pass over the wire format (decodeChunkTree) into slabs
// of chunks and digests whose hashes share one string: no allocation per
// chunk. Anything else a Tree may hold (child directories, symlinks, file
// timestamps, modes, a root sent in parts, text that is not UTF-8) goes
// through the full protobuf decoder.
func decodeTree(name string, b []byte) (*snapshotpb.ChunkedFile, error) {
	if cf, ok := decodeChunkTree(name, b); ok {
		if err := cow.ValidateChunkedFile(cf); err != nil {
			return nil, err
		}
		return cf, nil
	}
	t := &repb.Tree{}
	if err := proto.Unmarshal(b, t); err != nil {
		return nil, invalidf("chunked file %q: decoding tree: %v", name, err)
	}
	return ChunkedFileFromTree(name, t)
}

// Field numbers of the REAPI messages a chunk tree uses.
const (
	treeRoot       = 1 // Tree.root
	dirFiles       = 1 // Directory.files
	dirProperties  = 5 // Directory.node_properties
	fileName       = 1 // FileNode.name
	fileDigest     = 2 // FileNode.digest
	fileExecutable = 4 // FileNode.is_executable
	fileProperties = 6 // FileNode.node_properties
	propsList      = 1 // NodeProperties.properties
	propName       = 1 // NodeProperty.name
	propValue      = 2 // NodeProperty.value
	digestHash     = 1 // Digest.hash
	digestSize     = 2 // Digest.size_bytes
	wireBytes      = protowire.BytesType
	wireVarint     = protowire.VarintType
)

// decodeChunkTree is decodeTree's one-pass decoder; ok is false when b is
// not in the shape it reads (or not a valid Tree), and the caller falls
// back to the protobuf decoder, which also gives the error.
func decodeChunkTree(name string, b []byte) (cf *snapshotpb.ChunkedFile, ok bool) {
	s := string(b) // one copy: every hash and name is a slice of it
	var root string
	rootSeen := false
	if !eachField(s, func(num protowire.Number, typ protowire.Type, v string) bool {
		if num != treeRoot {
			return num != 2 // Tree.children: not in a chunk tree
		}
		if typ != wireBytes || rootSeen {
			return false
		}
		root, rootSeen = v, true
		return true
	}) {
		return nil, false
	}
	if !rootSeen {
		return nil, false
	}
	// Count the chunks first, so that they are allocated once, in place.
	n := 0
	if !eachField(root, func(num protowire.Number, typ protowire.Type, v string) bool {
		switch num {
		case dirFiles:
			n++
			return typ == wireBytes
		case dirProperties:
			return typ == wireBytes
		}
		return num != 2 && num != 3 // directories, symlinks
	}) {
		return nil, false
	}
	cf = &snapshotpb.ChunkedFile{Name: name, Size: -1, ChunkSize: -1}
	chunks := make([]snapshotpb.Chunk, n)
	digests := make([]repb.Digest, n)
	var outboards []repb.Digest
	cf.Chunks = make([]*snapshotpb.Chunk, 0, n)
	ok = eachField(root, func(num protowire.Number, _ protowire.Type, v string) bool {
		switch num {
		case dirProperties:
			return eachProperty(v, func(pn, pv string) bool {
				return setDirProperty(cf, pn, pv) == nil // else the full decoder says why
			})
		case dirFiles:
			i := len(cf.Chunks)
			c, d := &chunks[i], &digests[i]
			var fname string
			hasDigest := false
			if !eachField(v, func(num protowire.Number, typ protowire.Type, v string) bool {
				switch num {
				case fileName:
					fname = v
					return typ == wireBytes && utf8.ValidString(v)
				case fileDigest:
					hasDigest = true
					return typ == wireBytes && decodeDigest(v, d)
				case fileExecutable:
					return typ == wireVarint
				case fileProperties:
					return typ == wireBytes && eachProperty(v, func(pn, pv string) bool {
						if pn != propOutboard {
							return true
						}
						if outboards == nil {
							outboards = make([]repb.Digest, n)
						}
						ob, err := parseOutboard(pv)
						if err != nil {
							return false
						}
						o := &outboards[i]
						o.Hash, o.SizeBytes = ob.GetHash(), ob.GetSizeBytes()
						c.Outboard = o
						return true
					})
				}
				return true // unknown to FileNode
			}) {
				return false
			}
			off, err := chunkOffset(name, fname)
			if err != nil {
				return false
			}
			c.Offset = off
			if hasDigest {
				c.Digest = d
			}
			cf.Chunks = append(cf.Chunks, c)
		}
		return true
	})
	if !ok || cf.Size < 0 || cf.ChunkSize < 0 {
		return nil, false
	}
	return cf, true
}

// eachProperty calls f with each property of the NodeProperties message
// v; it is false if v holds anything but well-formed UTF-8 properties (the
// timestamp and mode fields are left to the full decoder).
func eachProperty(v string, f func(name, value string) bool) bool {
	return eachField(v, func(num protowire.Number, typ protowire.Type, p string) bool {
		if num != propsList {
			return false
		}
		if typ != wireBytes {
			return false
		}
		var pn, pv string
		if !eachField(p, func(num protowire.Number, typ protowire.Type, x string) bool {
			switch num {
			case propName:
				pn = x
			case propValue:
				pv = x
			default:
				return true
			}
			return typ == wireBytes && utf8.ValidString(x)
		}) {
			return false
		}
		return f(pn, pv)
	})
}

// decodeDigest merges the Digest message v into d, as protobuf merges a
// repeated message field.
func decodeDigest(v string, d *repb.Digest) bool {
	return eachField(v, func(num protowire.Number, typ protowire.Type, x string) bool {
		switch num {
		case digestHash:
			d.Hash = x
			return typ == wireBytes && utf8.ValidString(x)
		case digestSize:
			if typ != wireVarint {
				return false
			}
			n, _ := protowire.ConsumeVarint(unsafeBytes(x))
			d.SizeBytes = int64(n)
		}
		return true
	})
}

// eachField calls f with each field of the message s: its number, wire
// type and value (the payload of a length-delimited field, the encoded
// varint of a varint field, the raw bytes otherwise). It is false if s is
// not well-formed or f returns false.
func eachField(s string, f func(protowire.Number, protowire.Type, string) bool) bool {
	for len(s) > 0 {
		num, typ, n := protowire.ConsumeTag(unsafeBytes(s))
		if n < 0 {
			return false
		}
		s = s[n:]
		m := protowire.ConsumeFieldValue(num, typ, unsafeBytes(s))
		if m < 0 {
			return false
		}
		v := s[:m]
		if typ == wireBytes {
			_, k := protowire.ConsumeVarint(unsafeBytes(v))
			v = v[k:]
		}
		if !f(num, typ, v) {
			return false
		}
		s = s[m:]
	}
	return true
}

// unsafeBytes is s as a byte slice without a copy, for the protowire
// functions, which only read it.
func unsafeBytes(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }

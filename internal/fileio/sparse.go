package fileio

import (
	"os"

	"github.com/snaploader/snaploader/digest"
)

// SparseHoleMin is the shortest run of zeros WriteSparse leaves as a hole:
// shorter runs cost more in extents than they save.
const SparseHoleMin = 64 << 10

const page = 4096

// WriteSparse writes b at off, leaving page-aligned zero runs of at least
// SparseHoleMin bytes unwritten (holes, once the file is sized), with one
// write per data run. The error of a write keeps its cause.
func WriteSparse(f *os.File, b []byte, off int64) error {
	run := 0 // start of the pending data run
	for i := 0; i < len(b); {
		if mis := int((off + int64(i)) % page); mis != 0 {
			i += min(page-mis, len(b)-i) // to the next page boundary of the file
			continue
		}
		if i+SparseHoleMin > len(b) || !digest.IsZero(b[i:i+page]) {
			i += min(page, len(b)-i)
			continue
		}
		// Measure the zero run starting at page i.
		z := i
		for z+page <= len(b) && digest.IsZero(b[z:z+page]) {
			z += page
		}
		if z-i < SparseHoleMin {
			i = z
			continue
		}
		if run < i {
			if _, err := f.WriteAt(b[run:i], off+int64(run)); err != nil {
				return err
			}
		}
		i, run = z, z
	}
	if run < len(b) {
		if _, err := f.WriteAt(b[run:], off+int64(run)); err != nil {
			return err
		}
	}
	return nil
}

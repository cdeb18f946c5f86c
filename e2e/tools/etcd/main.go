// Command etcd runs the etcd server for ephemera's end-to-end control plane.
//
// `go install go.etcd.io/etcd/server/v3` fails because etcd's own go.mod uses
// replace directives; a wrapper module that calls etcdmain.Main builds cleanly.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

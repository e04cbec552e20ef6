//go:build tools

// Package tools only pins, for `go mod tidy`, the dependencies of the etcd
// server that testenv/k8s/build compiles.
package tools

import (
	_ "go.etcd.io/etcd/server/v3/etcdmain"
)

//go:build tools

// Package tools only pins, for `go mod tidy`, the dependencies of kwok, which
// testenv/k8s/build compiles to give Pods fake nodes.
package tools

import (
	_ "sigs.k8s.io/kwok/pkg/kwok/cmd"
)

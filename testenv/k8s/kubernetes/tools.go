//go:build tools

// Package tools only pins, for `go mod tidy`, the dependencies of the
// commands that testenv/k8s/build compiles from k8s.io/kubernetes (the
// kubelet and kube-proxy too, for `k8s-up --node`).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/component-base/cli"
)

// Command pause is the process of every pod sandbox on the test node of
// `testenv/k8s/k8s-up --node` (containerd's sandbox_image): there is no
// registry to pull the usual pause image from, so the image is made locally
// from this static binary. It holds the pod's namespaces, reaps the children
// that end up with it (PID 1 of a shared PID namespace) and exits on SIGINT
// or SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

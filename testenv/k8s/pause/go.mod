module flowgate.test/testenv/k8s/pause

go 1.24

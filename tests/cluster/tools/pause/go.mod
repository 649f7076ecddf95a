// The pause program of the local cluster's pod sandboxes (see main.go).
module zimage.dev/cluster-tools/pause

go 1.26.0

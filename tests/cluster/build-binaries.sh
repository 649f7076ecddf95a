#!/usr/bin/env bash
# Builds the local test cluster's programs from Go modules into a cache keyed by version:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy, etcd, kwok,
# helm, crictl, the pod sandboxes' pause program, and buildkitd and buildctl; and KEDA's CRDs
# (ScaledObject, HTTPScaledObject) from their modules, into BIN/crds.
# Each program's version comes from the go.mod of its module under tools/; a program already
# in the cache is not built again. Prints the folder that holds the binaries.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${ZIMAGE_CLUSTER_CACHE:-$HOME/.cache/zimage/cluster-bin}
go_version=$(go env GOVERSION)
export CGO_ENABLED=0

module_version() { # module folder, module path
	(cd "$here/tools/$1" && go list -m -f '{{.Version}}' "$2")
}

k8s=$(module_version kubernetes k8s.io/kubernetes)
etcd=$(module_version etcd go.etcd.io/etcd/server/v3)
kwok=$(module_version kwok sigs.k8s.io/kwok)
helm=$(module_version helm helm.sh/helm/v3)
crictl=$(module_version cri-tools sigs.k8s.io/cri-tools)
buildkit=$(module_version buildkit github.com/moby/buildkit)
key="k8s-$k8s-etcd-$etcd-kwok-$kwok-helm-$helm-crictl-$crictl-buildkit-$buildkit-$go_version"
bin="$cache/$key"
mkdir -p "$bin"

build() { # name, module folder, package, ldflags
	local name=$1 folder=$2 package=$3 ldflags=$4
	if [[ -x "$bin/$name" ]]; then
		return
	fi
	echo "building $name ($package)" >&2
	local started=$SECONDS
	(cd "$here/tools/$folder" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.partial" "$package")
	mv "$bin/$name.partial" "$bin/$name"
	echo "built $name in $((SECONDS - started))s" >&2
}

k8s_minor=$(echo "$k8s" | cut -d. -f2)
k8s_stamp="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1"
k8s_stamp+=" -X k8s.io/component-base/version.gitMinor=$k8s_minor -X k8s.io/component-base/version.gitTreeState=clean"
k8s_stamp+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
k8s_stamp+=" -X k8s.io/client-go/pkg/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitMajor=1"
k8s_stamp+=" -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"

for component in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
	build "$component" kubernetes "k8s.io/kubernetes/cmd/$component" "$k8s_stamp"
done
build etcd etcd go.etcd.io/etcd/server/v3 "-X go.etcd.io/etcd/api/v3/version.GitSHA=module-$etcd"
build kwok kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${kwok#v}"
helm_stamp="-X helm.sh/helm/v3/internal/version.version=$helm -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
helm_stamp+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"
helm_stamp+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
build helm helm helm.sh/helm/v3/cmd/helm "$helm_stamp"

build crictl cri-tools sigs.k8s.io/cri-tools/cmd/crictl "-X sigs.k8s.io/cri-tools/pkg/version.Version=$crictl"
build pause pause . ""
buildkit_stamp="-X github.com/moby/buildkit/version.Version=$buildkit"
build buildkitd buildkit github.com/moby/buildkit/cmd/buildkitd "$buildkit_stamp"
build buildctl buildkit github.com/moby/buildkit/cmd/buildctl "$buildkit_stamp"

# KEDA's own CRDs, read from the modules tools/keda pins (go.sum checks what the proxy sent).
keda=$(module_version keda github.com/kedacore/keda/v2)
http_addon=$(module_version keda github.com/kedacore/http-add-on)
crds="$bin/crds/keda-$keda-http-add-on-$http_addon"
if [[ ! -f "$crds/.complete" ]]; then
	mkdir -p "$crds"
	module_dir() { # module path
		(cd "$here/tools/keda" && go mod download "$1" && go list -m -f '{{.Dir}}' "$1")
	}
	cp "$(module_dir github.com/kedacore/keda/v2)/config/crd/bases/keda.sh_scaledobjects.yaml" "$crds/"
	cp "$(module_dir github.com/kedacore/http-add-on)/config/crd/bases/http.keda.sh_httpscaledobjects.yaml" "$crds/"
	chmod u+w "$crds"/*.yaml
	touch "$crds/.complete"
fi
ln -sfn "$crds" "$bin/crds/keda"

echo "$bin"

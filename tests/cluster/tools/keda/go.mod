// KEDA's CRDs for the cluster tests: the ScaledObject from KEDA itself and the HTTPScaledObject
// from its HTTP add-on, read from their modules' config/crd/bases (nothing here is built).
module zimage.dev/tools/keda

go 1.26

require (
	github.com/kedacore/http-add-on v0.12.0
	github.com/kedacore/keda/v2 v2.21.0
)

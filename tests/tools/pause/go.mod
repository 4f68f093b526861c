// The test bed's pause program: the node's sandbox image, and a probe for the node's tests.
// Standard library only, so it builds without the module proxy.
module capl.test/tools/pause

go 1.26.0

// Command kube is a multi-call binary that embeds the Kubernetes components
// ephemera's end-to-end tests run: the control plane (kube-apiserver,
// kube-controller-manager, kube-scheduler), the real node's kubelet and
// kube-proxy, and kubectl.
//
// One binary links the shared Kubernetes packages once instead of four times,
// which is most of the cold build time on a 2-core machine. The component is
// chosen by the name it is invoked as (symlinks made by e2e/scripts/tools.sh)
// or by the first argument: `kube apiserver --help`.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectl "k8s.io/kubectl/pkg/cmd"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

var components = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kube-proxy":              proxy.NewProxyCommand,
	"kubelet":                 func() *cobra.Command { return kubelet.NewKubeletCommand(context.Background()) },
	"kubectl":                 kubectl.NewDefaultKubectlCommand,
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := components[name]; !ok && len(os.Args) > 1 {
		name = os.Args[1]
		if !strings.HasPrefix(name, "kube") {
			name = "kube-" + name
		}
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	newCommand, ok := components[name]
	if !ok {
		fmt.Fprintln(os.Stderr, "usage: kube {apiserver|controller-manager|scheduler|kubelet|proxy|kubectl} [flags]")
		os.Exit(2)
	}
	if name == "kubectl" {
		// kubectl prints its own errors; cli.Run would print them twice.
		if err := cli.RunNoErrOutput(newCommand()); err != nil {
			os.Exit(1)
		}
		return
	}
	os.Exit(cli.Run(newCommand()))
}

// Command pause is the test bed's Pod sandbox process and a tiny probe for the node's tests.
//
//	pause                 wait for SIGTERM or SIGINT (exit 0), reaping children meanwhile
//	pause probe [secs]    connect to the apiserver through $KUBERNETES_SERVICE_HOST:
//	                      $KUBERNETES_SERVICE_PORT with the Pod's service-account CA and token,
//	                      GET /version, print it and exit 0 (retries for secs, default 60)
//	pause serve <port>    answer every HTTP request on :port with "capl-pause <hostname>"
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	mode := ""
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	switch mode {
	case "":
		pause()
	case "probe":
		seconds := 60
		if len(os.Args) > 2 {
			n, err := strconv.Atoi(os.Args[2])
			if err != nil {
				fail("probe: bad duration %q", os.Args[2])
			}
			seconds = n
		}
		probe(time.Duration(seconds) * time.Second)
	case "serve":
		if len(os.Args) < 3 {
			fail("serve: missing port")
		}
		serve(os.Args[2])
	default:
		fail("unknown mode %q (want none, probe or serve)", mode)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "pause: "+format+"\n", args...)
	os.Exit(2)
}

// pause blocks until SIGTERM or SIGINT and reaps every child that exits meanwhile (as PID 1 of a
// sandbox it inherits orphans).
func pause() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		os.Exit(0)
	}
}

func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// probe proves in-cluster access: the Service's ClusterIP, the CA Kubernetes mounts into the
// Pod, and the Pod's own token.
func probe(budget time.Duration) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		fail("probe: KUBERNETES_SERVICE_HOST/PORT are not set")
	}
	caPEM, err := os.ReadFile(serviceAccountDir + "/ca.crt")
	if err != nil {
		fail("probe: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		fail("probe: no certificate in ca.crt")
	}
	token, err := os.ReadFile(serviceAccountDir + "/token")
	if err != nil {
		fail("probe: %v", err)
	}
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "kubernetes.default.svc"},
		},
	}
	url := "https://" + net.JoinHostPort(host, port) + "/version"
	deadline := time.Now().Add(budget)
	for {
		body, err := get(client, url, strings.TrimSpace(string(token)))
		if err == nil {
			fmt.Printf("probe: %s answered: %s\n", url, body)
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "probe: %s: %v\n", url, err)
		if time.Now().After(deadline) {
			os.Exit(1)
		}
		time.Sleep(time.Second)
	}
}

func get(client *http.Client, url, token string) (string, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %d: %s", resp.StatusCode, body)
	}
	return strings.TrimSpace(string(body)), nil
}

// serve answers every request with the Pod's hostname, until SIGTERM.
func serve(port string) {
	hostname, _ := os.Hostname()
	handler := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "capl-pause %s\n", hostname)
	})
	server := &http.Server{Addr: ":" + port, Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		<-signals
		os.Exit(0)
	}()
	if err := server.ListenAndServe(); err != nil {
		fail("serve: %v", err)
	}
}

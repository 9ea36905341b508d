// Command fleet is the cluster-shaped load model's clients: N kubelets, each on its own
// TLS HTTP/2 connection with its own certificate (CN=system:node:<name>, O=system:nodes),
// plus a scheduler, controllers' informers and a pod writer, all as Go's net/http (the
// HTTP/2 stack of client-go and kube-apiserver) does it. Standard library only.
//
// Per kubelet (cluster-shape.md): its Node and its Lease created at start; LIST+WATCH of
// its own pods (fieldSelector=spec.nodeName=<node>); the lease renewed every
// -lease-interval (up to 5 immediate retries, as the kubelet); a node-status PATCH every
// -status-interval; an Event POSTed for each pod that reaches it. Cluster-wide: a writer
// creating -churn pods a second (deleting as many once -live are up), a scheduler that
// watches all pods and binds each new one to a node (POST pods/<name>/binding), and
// -informers controllers with informers over all pods and all nodes that relist every
// -relist. The watch delivery latency is binding sent -> the owning kubelet's watch event.
//
// It prints a progress line a second on stderr ({"t":..,"watches_up":..}) and a JSON
// summary on stdout at the end. Everything it connects to is -target (127.0.0.1 only).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	target      = flag.String("target", "", "https://127.0.0.1:PORT of the gateway, HAProxy or apiserver")
	caFile      = flag.String("ca", "", "cluster CA certificate (verifies the server; signs our clients)")
	caKeyFile   = flag.String("ca-key", "", "cluster CA key: every client's certificate is made from it")
	nodes       = flag.Int("nodes", 100, "kubelets, each with its own connection and identity")
	duration    = flag.Duration("duration", 60*time.Second, "how long the day lasts")
	ramp        = flag.Duration("ramp", 0, "spread the kubelets' start over this (0: all at once, a storm)")
	leaseEvery  = flag.Duration("lease-interval", 10*time.Second, "node lease renewal period")
	statusEvery = flag.Duration("status-interval", 60*time.Second, "node status PATCH period")
	churn       = flag.Float64("churn", 20, "pods created per second (as many deleted once -live exist)")
	live        = flag.Int("live", 600, "pods kept alive by the writer")
	informers   = flag.Int("informers", 2, "controllers with informers over all pods and nodes")
	relist      = flag.Duration("relist", 60*time.Second, "informers relist this often")
	prefix      = flag.String("prefix", "node", "node names are <prefix>-<i>")
	settle      = flag.Duration("settle", 5*time.Second, "pods bound this long before the end must have been delivered")
)

// ---- measurements ----------------------------------------------------------------------

type histogram struct {
	mu sync.Mutex
	ms []float64
}

func (h *histogram) add(d time.Duration) {
	h.mu.Lock()
	h.ms = append(h.ms, float64(d.Microseconds())/1000)
	h.mu.Unlock()
}

func (h *histogram) summary() map[string]float64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	v := append([]float64(nil), h.ms...)
	sort.Float64s(v)
	q := func(p float64) float64 {
		if len(v) == 0 {
			return 0
		}
		return v[int(p*float64(len(v)-1))]
	}
	return map[string]float64{"n": float64(len(v)), "p50": q(0.5), "p99": q(0.99), "max": q(1)}
}

type counters struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *counters) inc(key string) {
	c.mu.Lock()
	c.m[key]++
	c.mu.Unlock()
}

var failureLines, retriedLines int64

// failed counts a failure and, for the first 5,000, says when on stderr (the SLO test
// tells failures inside a fault's window from those outside it).
func failed(key string) {
	failures.inc(key)
	if atomic.AddInt64(&failureLines, 1) <= 5000 {
		line, _ := json.Marshal(map[string]any{"t": time.Since(start).Seconds(), "failure": key})
		fmt.Fprintln(os.Stderr, string(line))
	}
}

// retried counts a write answered 429/503 with a Retry-After (client-go retries it) and,
// for the first 1,000, says when, as failed does.
func retried(key string) {
	retriable.inc(key)
	if atomic.AddInt64(&retriedLines, 1) <= 1000 {
		line, _ := json.Marshal(map[string]any{"t": time.Since(start).Seconds(), "retriable": key})
		fmt.Fprintln(os.Stderr, string(line))
	}
}

func (c *counters) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for k, v := range c.m {
		out[k] = v
	}
	return out
}

var (
	start        = time.Now()
	watchLatency histogram // binding sent -> the owning kubelet's watch event
	leaseLatency histogram // a renewal, retries included
	watchSteady  histogram // watchLatency's bindings sent after the start storm
	leaseSteady  histogram // leaseLatency's renewals begun after the start storm
	statusLat    histogram
	listLatency  histogram
	failures     = counters{m: map[string]int{}} // "<kind> <what>": an HTTP status or a transport error
	retriable    = counters{m: map[string]int{}} // writes answered 429/503 with Retry-After
	watchesUp    int64                           // kubelets whose pod watch is open now
	everUp       int64                           // kubelets whose pod watch was up once
	allUpAt      atomic.Value                    // time.Duration: every kubelet's watch up (first time)
	leaseGapMax  int64                           // ns: the longest time a kubelet went without a renewal
	bound        sync.Map                        // pod name -> time the binding was sent
	delivered    sync.Map                        // pod name -> true
	boundCount   int64
	nodeNames    []string
)

// ---- clients ---------------------------------------------------------------------------

type client struct {
	http     *http.Client
	name     string
	agent    string
	inflight int64 // requests (not watches) under way now, and at most so far: what a
	peak     int64 // gateway's fair share per client (overload.perClient) counts
}

func newClient(ca *x509.CertPool, caCert *x509.Certificate, caKey any, cn string, orgs []string, agent string) *client {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	must(err)
	transport := &http.Transport{
		TLSClientConfig: &tls.Config{
			RootCAs:      ca,
			Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		},
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second, // client-go's
		IdleConnTimeout:     90 * time.Second,
		MaxIdleConnsPerHost: 25,
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
	}
	return &client{http: &http.Client{Transport: transport}, name: cn, agent: agent}
}

type answer struct {
	status int
	body   []byte
	retry  string
}

// do sends one request; a transport error or a status >= 400 is counted under kind.
func (c *client) do(ctx context.Context, kind, method, path, contentType string, body any, timeout time.Duration) (answer, error) {
	var reader io.Reader
	if body != nil {
		raw, _ := json.Marshal(body)
		reader = bytes.NewReader(raw)
	}
	day := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, *target+path, reader)
	req.Header.Set("User-Agent", c.agent)
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for now, peak := atomic.AddInt64(&c.inflight, 1), atomic.LoadInt64(&c.peak); now > peak; peak = atomic.LoadInt64(&c.peak) {
		if atomic.CompareAndSwapInt64(&c.peak, peak, now) {
			break
		}
	}
	defer atomic.AddInt64(&c.inflight, -1)
	resp, err := c.http.Do(req)
	if err != nil {
		if day.Err() != nil {
			return answer{}, err // the day ended with it in flight: not a failure
		}
		failed(kind + " " + transportError(err))
		return answer{}, err
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		if day.Err() == nil {
			failed(kind + " " + transportError(err))
		}
		return answer{}, err
	}
	a := answer{resp.StatusCode, data, resp.Header.Get("Retry-After")}
	if a.status >= 400 && !(a.status == 409 && (kind == "create-node" || kind == "create-lease" || kind == "bind-after-cut")) {
		if (a.status == 429 || a.status == 503) && a.retry != "" && method != "GET" {
			retried(fmt.Sprintf("%s %d", kind, a.status))
		} else {
			failed(fmt.Sprintf("%s %d", kind, a.status))
		}
	}
	return a, nil
}

func transportError(err error) string {
	text := err.Error()
	for _, known := range []string{"connection refused", "connection reset", "EOF", "timeout",
		"handshake", "broken pipe", "GOAWAY", "stream error", "deadline exceeded"} {
		if strings.Contains(text, known) {
			return known
		}
	}
	if len(text) > 60 {
		text = text[len(text)-60:]
	}
	return text
}

// ---- watch streams ---------------------------------------------------------------------

type event struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

type meta struct {
	Metadata struct {
		Name            string `json:"name"`
		Namespace       string `json:"namespace"`
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Spec struct {
		NodeName string `json:"nodeName"`
	} `json:"spec"`
	Code int `json:"code"` // an ERROR event's Status
}

type list struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	Items []meta `json:"items"`
}

// watch opens a watch and calls onEvent per event until it ends; onOpen once its headers
// arrive. Returns the last resourceVersion seen and whether it ended with 410 Gone.
func (c *client) watch(ctx context.Context, kind, path, rv string, onOpen func(), onEvent func(string, meta)) (string, bool) {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	timeout := 300 + mrand.Intn(300) // seconds: client-go's random [5, 10) minutes
	full := fmt.Sprintf("%s%swatch=1&allowWatchBookmarks=true&resourceVersion=%s&timeoutSeconds=%d", path, sep, rv, timeout)
	req, _ := http.NewRequestWithContext(ctx, "GET", *target+full, nil)
	req.Header.Set("User-Agent", c.agent)
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			failed(kind + " " + transportError(err))
		}
		return rv, false
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		failed(fmt.Sprintf("%s %d", kind, resp.StatusCode))
		io.Copy(io.Discard, resp.Body)
		return rv, resp.StatusCode == 410
	}
	onOpen()
	decoder := json.NewDecoder(bufio.NewReaderSize(resp.Body, 64<<10))
	for {
		var ev event
		if err := decoder.Decode(&ev); err != nil {
			if ctx.Err() == nil && err != io.EOF {
				failed(kind + "-stream " + transportError(err))
			}
			return rv, false
		}
		var m meta
		json.Unmarshal(ev.Object, &m)
		if ev.Type == "ERROR" {
			return rv, m.Code == 410
		}
		if m.Metadata.ResourceVersion != "" {
			rv = m.Metadata.ResourceVersion
		}
		if ev.Type != "BOOKMARK" {
			onEvent(ev.Type, m)
		}
	}
}

func (c *client) list(ctx context.Context, kind, path string) (list, bool) {
	began := time.Now()
	a, err := c.do(ctx, kind, "GET", path, "", nil, 60*time.Second)
	if err != nil || a.status != 200 {
		return list{}, false
	}
	listLatency.add(time.Since(began))
	var l list
	if json.Unmarshal(a.body, &l) != nil {
		failed(kind + " undecodable")
		return list{}, false
	}
	return l, true
}

// ---- the kubelet -----------------------------------------------------------------------

type kubelet struct {
	*client
	node    string
	up      bool
	mu      sync.Mutex
	lease   map[string]any
	renewed time.Time
}

func (k *kubelet) setUp(up bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if up == k.up {
		return
	}
	k.up = up
	if up {
		atomic.AddInt64(&watchesUp, 1)
	} else {
		atomic.AddInt64(&watchesUp, -1)
	}
}

func (k *kubelet) run(ctx context.Context, wg *sync.WaitGroup) {
	defer wg.Done()
	node := map[string]any{"apiVersion": "v1", "kind": "Node", "metadata": map[string]any{
		"name": k.node, "labels": map[string]string{"kubernetes.io/hostname": k.node}}}
	// registerWithAPIServer: until it is registered, with the kubelet's backoff
	for backoff := 100 * time.Millisecond; ctx.Err() == nil; backoff = min(2*backoff, 7*time.Second) {
		a, err := k.do(ctx, "create-node", "POST", "/api/v1/nodes", "application/json", node, 30*time.Second)
		if err == nil && (a.status == 201 || a.status == 409) {
			break
		}
		sleep(ctx, backoff)
	}
	k.createLease(ctx)
	go k.renewLoop(ctx)
	go k.statusLoop(ctx)
	k.podLoop(ctx)
}

func (k *kubelet) podLoop(ctx context.Context) {
	path := "/api/v1/pods?fieldSelector=" + url.QueryEscape("spec.nodeName="+k.node)
	first := true
	rv := ""
	for ctx.Err() == nil {
		if rv == "" {
			l, ok := k.list(ctx, "kubelet-list", path)
			if !ok {
				sleep(ctx, time.Second)
				continue
			}
			for _, pod := range l.Items {
				k.sawPod(ctx, pod)
			}
			rv = l.Metadata.ResourceVersion
		}
		var gone bool
		rv, gone = k.watch(ctx, "kubelet-watch", path, rv, func() {
			k.setUp(true)
			if first {
				first = false
				if atomic.AddInt64(&everUp, 1) == int64(*nodes) {
					allUpAt.Store(time.Since(start))
				}
			}
		}, func(kind string, pod meta) {
			if kind == "ADDED" || kind == "MODIFIED" {
				k.sawPod(ctx, pod)
			}
		})
		k.setUp(false)
		if gone {
			rv = ""
		} else if ctx.Err() == nil {
			sleep(ctx, 100*time.Millisecond) // the reflector's backoff floor
		}
	}
}

// afterStorm: t came after every kubelet's watch was first up (the start storm's end;
// before it, a pod bound reaches its kubelet in the first LIST, a renewal waits behind
// thousands of handshakes).
func afterStorm(t time.Time) bool {
	up, ok := allUpAt.Load().(time.Duration)
	return ok && t.Sub(start) >= up
}

func (k *kubelet) sawPod(ctx context.Context, pod meta) {
	name := pod.Metadata.Name
	if _, seen := delivered.LoadOrStore(name, true); seen {
		return
	}
	if sent, ok := bound.Load(name); ok {
		at := sent.(time.Time)
		watchLatency.add(time.Since(at))
		if afterStorm(at) {
			watchSteady.add(time.Since(at))
		}
	}
	ev := map[string]any{
		"apiVersion": "v1", "kind": "Event",
		"metadata":       map[string]any{"generateName": name + ".", "namespace": pod.Metadata.Namespace},
		"involvedObject": map[string]any{"kind": "Pod", "name": name, "namespace": pod.Metadata.Namespace},
		"reason":         "Started", "message": "Started container", "type": "Normal",
		"source": map[string]any{"component": "kubelet", "host": k.node},
	}
	go k.do(ctx, "event", "POST", "/api/v1/namespaces/"+pod.Metadata.Namespace+"/events", "application/json", ev, 30*time.Second)
}

const leasePath = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"

func (k *kubelet) createLease(ctx context.Context) {
	lease := map[string]any{"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
		"metadata": map[string]any{"name": k.node, "namespace": "kube-node-lease"},
		"spec": map[string]any{"holderIdentity": k.node, "leaseDurationSeconds": 40,
			"renewTime": time.Now().UTC().Format("2006-01-02T15:04:05.000000Z")}}
	a, err := k.do(ctx, "create-lease", "POST", leasePath, "application/json", lease, 30*time.Second)
	if err == nil && (a.status == 201 || a.status == 409) {
		k.renewed = time.Now()
	}
}

func (k *kubelet) renewLoop(ctx context.Context) {
	sleep(ctx, time.Duration(mrand.Int63n(int64(*leaseEvery))))
	for ctx.Err() == nil {
		began := time.Now()
		ok := false
		for try := 0; try < 5 && !ok && ctx.Err() == nil; try++ { // the kubelet's retries
			ok = k.renew(ctx)
		}
		if ok {
			leaseLatency.add(time.Since(began))
			if afterStorm(began) {
				leaseSteady.add(time.Since(began))
			}
			if !k.renewed.IsZero() {
				gap := int64(time.Since(k.renewed))
				for {
					old := atomic.LoadInt64(&leaseGapMax)
					if gap <= old || atomic.CompareAndSwapInt64(&leaseGapMax, old, gap) {
						break
					}
				}
			}
			k.renewed = time.Now()
		}
		sleep(ctx, *leaseEvery)
	}
}

// renew is the kubelet's: GET the lease when it has none cached, then PUT it renewed.
func (k *kubelet) renew(ctx context.Context) bool {
	if k.lease == nil {
		a, err := k.do(ctx, "lease-get", "GET", leasePath+"/"+k.node, "", nil, 10*time.Second)
		if err == nil && a.status == 404 { // ensureLease: none yet, create it
			k.createLease(ctx)
			return false
		}
		if err != nil || a.status != 200 || json.Unmarshal(a.body, &k.lease) != nil {
			k.lease = nil
			return false
		}
	}
	spec, _ := k.lease["spec"].(map[string]any)
	if spec == nil {
		spec = map[string]any{}
		k.lease["spec"] = spec
	}
	spec["renewTime"] = time.Now().UTC().Format("2006-01-02T15:04:05.000000Z")
	a, err := k.do(ctx, "lease-update", "PUT", leasePath+"/"+k.node, "application/json", k.lease, 10*time.Second)
	if err != nil || a.status != 200 || json.Unmarshal(a.body, &k.lease) != nil {
		k.lease = nil // a conflict or a failure: read it again
		return false
	}
	return true
}

func (k *kubelet) statusLoop(ctx context.Context) {
	sleep(ctx, time.Duration(mrand.Int63n(int64(*statusEvery))))
	for ctx.Err() == nil {
		patch := map[string]any{"status": map[string]any{"conditions": []map[string]any{{
			"type": "Ready", "status": "True", "reason": "KubeletReady",
			"lastHeartbeatTime": time.Now().UTC().Format(time.RFC3339)}}}}
		began := time.Now()
		a, err := k.do(ctx, "node-status", "PATCH", "/api/v1/nodes/"+k.node+"/status",
			"application/strategic-merge-patch+json", patch, 30*time.Second)
		if err == nil && a.status == 200 {
			statusLat.add(time.Since(began))
		}
		sleep(ctx, *statusEvery)
	}
}

// ---- cluster-wide clients --------------------------------------------------------------

func writer(ctx context.Context, c *client) {
	if *churn <= 0 {
		return
	}
	var mu sync.Mutex
	var made []string // pods created (201), oldest first
	tick := time.NewTicker(time.Duration(float64(time.Second) / *churn))
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		name := fmt.Sprintf("load-%d", i)
		pod := map[string]any{"apiVersion": "v1", "kind": "Pod",
			"metadata": map[string]any{"name": name, "namespace": "default", "labels": map[string]string{"app": "load"}},
			"spec":     map[string]any{"containers": []map[string]any{{"name": "c", "image": "registry.k8s.io/pause:3.9"}}}}
		go func(name string) {
			a, err := c.do(ctx, "create-pod", "POST", "/api/v1/namespaces/default/pods", "application/json", pod, 30*time.Second)
			if err != nil || a.status != 201 {
				return // (a ReplicaSet would try again; this writer moves on)
			}
			mu.Lock()
			made = append(made, name)
			var old string
			if len(made) > *live {
				old, made = made[0], made[1:]
			}
			mu.Unlock()
			if old != "" {
				c.do(ctx, "delete-pod", "DELETE", "/api/v1/namespaces/default/pods/"+old, "", nil, 30*time.Second)
			}
		}(name)
	}
}

func scheduler(ctx context.Context, c *client) {
	next := 0
	bind := func(pod meta) {
		if pod.Spec.NodeName != "" || pod.Metadata.Name == "" {
			return
		}
		node := nodeNames[next%len(nodeNames)]
		next++
		b := map[string]any{"apiVersion": "v1", "kind": "Binding",
			"metadata": map[string]any{"name": pod.Metadata.Name},
			"target":   map[string]any{"apiVersion": "v1", "kind": "Node", "name": node}}
		path := "/api/v1/namespaces/" + pod.Metadata.Namespace + "/pods/" + pod.Metadata.Name + "/binding"
		go func(name string) {
			// the scheduler requeues a pod whose binding failed (with a backoff); a binding
			// whose answer was lost in a cut connection may have been made: its retry
			// ("bind-after-cut") finds the pod bound, a 409 that is no failure
			kind := "bind"
			for try := 0; try < 10 && ctx.Err() == nil; try++ {
				bound.Store(name, time.Now())
				a, err := c.do(ctx, kind, "POST", path, "application/json", b, 30*time.Second)
				if err == nil && (a.status == 201 || a.status == 409) { // (a first try's 409: failed)
					atomic.AddInt64(&boundCount, 1)
					return
				}
				if err != nil {
					kind = "bind-after-cut"
				}
				bound.Delete(name)
				if err == nil && a.status == 404 {
					return // deleted meanwhile
				}
				sleep(ctx, time.Second)
			}
		}(pod.Metadata.Name)
	}
	path := "/api/v1/pods?fieldSelector=" + url.QueryEscape("spec.nodeName=")
	rv := ""
	for ctx.Err() == nil {
		if rv == "" {
			l, ok := c.list(ctx, "scheduler-list", path)
			if !ok {
				sleep(ctx, time.Second)
				continue
			}
			for _, pod := range l.Items {
				bind(pod)
			}
			rv = l.Metadata.ResourceVersion
		}
		var gone bool
		rv, gone = c.watch(ctx, "scheduler-watch", path, rv, func() {}, func(kind string, pod meta) {
			if kind == "ADDED" {
				bind(pod)
			}
		})
		if gone {
			rv = ""
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// informer keeps name -> resourceVersion of every object at path, relisting every -relist.
type informer struct {
	mu    sync.Mutex
	cache map[string]string
}

func (inf *informer) run(ctx context.Context, c *client, kind, path string) {
	for ctx.Err() == nil {
		l, ok := c.list(ctx, kind+"-list", path)
		if !ok {
			sleep(ctx, time.Second)
			continue
		}
		fresh := map[string]string{}
		for _, o := range l.Items {
			fresh[o.Metadata.Namespace+"/"+o.Metadata.Name] = o.Metadata.ResourceVersion
		}
		inf.mu.Lock()
		inf.cache = fresh
		inf.mu.Unlock()
		rv := l.Metadata.ResourceVersion
		until, cancel := context.WithTimeout(ctx, *relist)
		for until.Err() == nil {
			var gone bool
			rv, gone = c.watch(until, kind+"-watch", path, rv, func() {}, func(t string, o meta) {
				key := o.Metadata.Namespace + "/" + o.Metadata.Name
				inf.mu.Lock()
				if t == "DELETED" {
					delete(inf.cache, key)
				} else {
					inf.cache[key] = o.Metadata.ResourceVersion
				}
				inf.mu.Unlock()
			})
			if gone {
				break
			}
			sleep(until, 100*time.Millisecond)
		}
		cancel()
	}
}

// consistent: the informer's cache equals a fresh LIST, once it has caught up (a few tries).
func (inf *informer) consistent(c *client, kind, path string) bool {
	for try := 0; try < 20; try++ {
		l, ok := c.list(context.Background(), kind+"-check", path)
		if ok {
			inf.mu.Lock()
			same := len(l.Items) == len(inf.cache)
			for _, o := range l.Items {
				if inf.cache[o.Metadata.Namespace+"/"+o.Metadata.Name] != o.Metadata.ResourceVersion {
					same = false
				}
			}
			inf.mu.Unlock()
			if same {
				return true
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return false
}

// ---- main ------------------------------------------------------------------------------

func min(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(2)
	}
}

func loadCA() (*x509.CertPool, *x509.Certificate, any) {
	certPEM, err := os.ReadFile(*caFile)
	must(err)
	keyPEM, err := os.ReadFile(*caKeyFile)
	must(err)
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	must(err)
	kb, _ := pem.Decode(keyPEM)
	var key any
	if key, err = x509.ParsePKCS8PrivateKey(kb.Bytes); err != nil {
		if key, err = x509.ParseECPrivateKey(kb.Bytes); err != nil {
			key, err = x509.ParsePKCS1PrivateKey(kb.Bytes)
		}
	}
	must(err)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool, cert, key
}

func main() {
	flag.Parse()
	if !strings.HasPrefix(*target, "https://127.") && !strings.HasPrefix(*target, "https://localhost") {
		must(fmt.Errorf("-target must be https:// on the loopback, not %q", *target))
	}
	pool, caCert, caKey := loadCA()
	ctx, stop := context.WithTimeout(context.Background(), *duration)
	defer stop()
	interrupted := make(chan os.Signal, 1)
	signal.Notify(interrupted, syscall.SIGINT, syscall.SIGTERM)
	watching, stopWatching := context.WithCancel(context.Background())
	defer stopWatching()
	go func() { <-interrupted; stop(); stopWatching() }()

	kubelets := make([]*kubelet, *nodes)
	for i := range kubelets {
		name := fmt.Sprintf("%s-%d", *prefix, i)
		nodeNames = append(nodeNames, name)
		kubelets[i] = &kubelet{client: newClient(pool, caCert, caKey, "system:node:"+name,
			[]string{"system:nodes"}, "kubelet/v1.31.0 (linux/amd64) kubernetes/abcdef0"), node: name}
	}
	controllers := newClient(pool, caCert, caKey, "system:kube-controller-manager", nil,
		"kube-controller-manager/v1.31.0 (linux/amd64) kubernetes/abcdef0/system:serviceaccount:kube-system:replicaset-controller")
	sched := newClient(pool, caCert, caKey, "system:kube-scheduler", nil,
		"kube-scheduler/v1.31.0 (linux/amd64) kubernetes/abcdef0/scheduler")
	start = time.Now()
	go func() { // progress, a line a second
		for ctx.Err() == nil {
			sleep(ctx, time.Second)
			fmt.Fprintf(os.Stderr, "{\"t\": %.1f, \"watches_up\": %d, \"bound\": %d}\n",
				time.Since(start).Seconds(), atomic.LoadInt64(&watchesUp), atomic.LoadInt64(&boundCount))
		}
	}()
	var wg sync.WaitGroup
	for i, k := range kubelets {
		wg.Add(1)
		go func(i int, k *kubelet) {
			if *ramp > 0 {
				sleep(ctx, time.Duration(int64(*ramp)*int64(i)/int64(*nodes)))
			}
			k.run(ctx, &wg)
		}(i, k)
	}
	// informers outlive the day's writes: their caches are checked while they still watch
	pods := make([]*informer, *informers)
	nodeInf := make([]*informer, *informers)
	for i := range pods {
		pods[i], nodeInf[i] = &informer{cache: map[string]string{}}, &informer{cache: map[string]string{}}
		go pods[i].run(watching, controllers, "informer-pods", "/api/v1/pods")
		go nodeInf[i].run(watching, controllers, "informer-nodes", "/api/v1/nodes")
	}
	go scheduler(ctx, sched)
	go writer(ctx, controllers)
	<-ctx.Done()
	wg.Wait()
	time.Sleep(time.Second) // writes still in flight land

	cutoff := time.Now().Add(-*settle)
	never := 0
	bound.Range(func(name, sent any) bool {
		if sent.(time.Time).Before(cutoff) {
			if _, ok := delivered.Load(name); !ok {
				never++
			}
		}
		return true
	})
	consistent := true
	for i := range pods {
		consistent = consistent && pods[i].consistent(controllers, "final-pods", "/api/v1/pods") &&
			nodeInf[i].consistent(controllers, "final-nodes", "/api/v1/nodes")
	}
	stopWatching()
	allUp := -1.0
	if v, ok := allUpAt.Load().(time.Duration); ok {
		allUp = v.Seconds()
	}
	summary := map[string]any{
		"kubelets":                      *nodes,
		"seconds":                       duration.Seconds(),
		"watch_delivery_ms":             watchLatency.summary(),
		"lease_ms":                      leaseLatency.summary(),
		"watch_delivery_after_storm_ms": watchSteady.summary(),
		"lease_after_storm_ms":          leaseSteady.summary(),
		"status_ms":                     statusLat.summary(),
		"list_ms":                       listLatency.summary(),
		"lease_gap_max_s":               float64(atomic.LoadInt64(&leaseGapMax)) / 1e9,
		"failures":                      failures.snapshot(),
		"retriable_writes":              retriable.snapshot(),
		"pods_bound":                    atomic.LoadInt64(&boundCount),
		"pods_never_delivered":          never,
		"all_watches_up_s":              allUp,
		"informers_consistent":          consistent,
		"peak_inflight":                 map[string]int64{"controllers": atomic.LoadInt64(&controllers.peak), "scheduler": atomic.LoadInt64(&sched.peak)},
	}
	out, _ := json.MarshalIndent(summary, "", " ")
	fmt.Println(string(out))
}

// Command apiserver is the cluster-shaped load model's upstream when the Python simulator
// would be the bottleneck (thousands of kubelets): the part of kube-apiserver the fleet
// uses, on Go's net/http (kube-apiserver's own HTTP/2 stack), standard library only.
//
// It serves the four groups (-ports default=P,pod=P,config=P,event=P) from one store
// and one resourceVersion counter (the groups' shared etcd), over TLS, authenticating as
// kube-apiserver does: a client certificate of -client-ca is its CN and O; a certificate
// of -requestheader-client-ca named in -requestheader-allowed-names (a front proxy) passes
// the user in X-Remote-User and X-Remote-Group; anyone else is 401. Resources: nodes
// (+status PATCH), pods (+binding), events, leases; create, get, list, update (with
// resourceVersion conflicts), merge patch, delete; list and watch with the
// fieldSelector spec.nodeName (objects entering or leaving the selector are ADDED or
// DELETED to that watch), resourceVersion replay from a history window (410 Gone before
// it), bookmarks, timeoutSeconds. /readyz, /healthz and /livez answer ok.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	ports        = flag.String("ports", "", "group=port,... (one listener each, one store)")
	certFile     = flag.String("tls-cert-file", "", "serving certificate")
	keyFile      = flag.String("tls-private-key-file", "", "its key")
	clientCA     = flag.String("client-ca-file", "", "CA of client certificates (user=CN, groups=O)")
	proxyCA      = flag.String("requestheader-client-ca-file", "", "CA of front-proxy certificates")
	allowedNames = flag.String("requestheader-allowed-names", "", "front-proxy CNs (comma-separated; empty: any)")
	historySize  = flag.Int("history", 100000, "watch events kept for resourceVersion replay")
	bookmarkEach = flag.Duration("bookmark-interval", 60*time.Second, "watch bookmarks")
	controlPort  = flag.Int("control-port", 0, "the fault switches' control API (0: none)")
)

type object = map[string]any

var generated uint64 // suffixes of generateName, unique as the apiserver's are (here: by count)

// ---- the store (the groups' shared etcd) ----------------------------------------------

type change struct {
	rv       uint64
	resource string
	kind     string // ADDED, MODIFIED, DELETED
	obj      object
	old      object // MODIFIED: the object before (field-selector transitions)
	line     []byte // {"type":..,"object":..}\n, made once
}

type watcher struct {
	resource string
	node     *string // fieldSelector spec.nodeName=<node> (nil: every object)
	ch       chan []byte
	dropped  bool // it fell too far behind: its channel is closed, its watch ends
}

// send queues a line for the watcher (under the store's lock); one that cannot keep up
// is dropped: its watch ends and its client re-lists, as from a cacher.
func (s *store) send(w *watcher, line []byte) {
	if w.dropped {
		return
	}
	select {
	case w.ch <- line:
	default:
		w.dropped = true
		delete(s.watchers, w)
		close(w.ch)
	}
}

type store struct {
	mu       sync.Mutex
	rv       uint64
	objects  map[string]map[string]object // resource -> namespace/name -> object
	history  []*change                    // a ring of the last -history changes
	next     int
	full     bool
	watchers map[*watcher]struct{}
}

func newStore() *store {
	s := &store{rv: 100, objects: map[string]map[string]object{}, watchers: map[*watcher]struct{}{},
		history: make([]*change, *historySize)}
	for _, r := range []string{"nodes", "pods", "events", "leases"} {
		s.objects[r] = map[string]object{}
	}
	return s
}

type apiError struct {
	code   int
	reason string
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func meta(o object) object {
	m, _ := o["metadata"].(object)
	if m == nil {
		m = object{}
		o["metadata"] = m
	}
	return m
}

func str(o object, key string) string { s, _ := o[key].(string); return s }

func nodeName(o object) string {
	if o == nil {
		return ""
	}
	spec, _ := o["spec"].(object)
	return str(spec, "nodeName")
}

// commit stores a change (under s.mu) and tells every watcher it concerns.
func (s *store) commit(resource, kind, key string, obj, old object) object {
	s.rv++
	meta(obj)["resourceVersion"] = strconv.FormatUint(s.rv, 10)
	if kind == "DELETED" {
		delete(s.objects[resource], key)
	} else {
		s.objects[resource][key] = obj
	}
	line, _ := json.Marshal(map[string]any{"type": kind, "object": obj})
	c := &change{rv: s.rv, resource: resource, kind: kind, obj: obj, old: old, line: append(line, '\n')}
	s.history[s.next] = c
	s.next = (s.next + 1) % len(s.history)
	if s.next == 0 {
		s.full = true
	}
	for w := range s.watchers {
		s.offer(w, c)
	}
	return obj
}

// offer gives a change to a watcher as the watcher's selector sees it.
func (s *store) offer(w *watcher, c *change) {
	if c.resource != w.resource {
		return
	}
	line := c.line
	if w.node != nil {
		now, was := nodeName(c.obj) == *w.node, c.old != nil && nodeName(c.old) == *w.node
		switch {
		case c.kind == "MODIFIED" && now && !was:
			line = eventLine("ADDED", c.obj)
		case c.kind == "MODIFIED" && !now && was:
			line = eventLine("DELETED", c.obj)
		case !now && !(c.kind == "DELETED" && was):
			return
		}
	}
	s.send(w, line)
}

func eventLine(kind string, obj object) []byte {
	line, _ := json.Marshal(map[string]any{"type": kind, "object": obj})
	return append(line, '\n')
}

func (s *store) oldest() uint64 {
	if !s.full {
		if s.next == 0 {
			return s.rv
		}
		return s.history[0].rv
	}
	return s.history[s.next].rv
}

// ---- serving ----------------------------------------------------------------------------

type server struct {
	s       *store
	allowed map[string]bool
	proxies *x509.CertPool
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	var e *apiError
	if !errors.As(err, &e) {
		e = &apiError{500, "InternalError", err.Error()}
	}
	writeJSON(w, e.code, object{"kind": "Status", "apiVersion": "v1", "metadata": object{},
		"status": "Failure", "message": e.msg, "reason": e.reason, "code": e.code})
}

// authenticated says who sent the request, as kube-apiserver's x509 and request-header
// authenticators would; "" when nobody.
func (sv *server) authenticated(r *http.Request) string {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return ""
	}
	cert := r.TLS.PeerCertificates[0]
	if sv.proxies != nil {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: sv.proxies,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
			if len(sv.allowed) > 0 && !sv.allowed[cert.Subject.CommonName] {
				return ""
			}
			return r.Header.Get("X-Remote-User")
		}
	}
	return cert.Subject.CommonName
}

// serve answers one request to a group whose faults are `f`.
func (sv *server) serve(w http.ResponseWriter, r *http.Request, f faults) {
	switch r.URL.Path {
	case "/readyz", "/healthz", "/livez":
		w.Write([]byte("ok"))
		return
	case "/version":
		writeJSON(w, 200, object{"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
		return
	}
	if sv.authenticated(r) == "" {
		writeError(w, &apiError{401, "Unauthorized", "Unauthorized"})
		return
	}
	if f.StatusOverride != 0 && (strings.HasPrefix(r.URL.Path, "/api/") || strings.HasPrefix(r.URL.Path, "/apis/")) {
		writeError(w, &apiError{f.StatusOverride, "InternalError", "simulated failure (status override)"})
		return
	}
	resource, ns, name, sub, ok := parsePath(r.URL.Path)
	if !ok {
		writeError(w, &apiError{404, "NotFound", "the server could not find the requested resource"})
		return
	}
	q := r.URL.Query()
	switch {
	case r.Method == "GET" && name == "" && (q.Get("watch") == "1" || q.Get("watch") == "true"):
		sv.watch(w, r, resource, q, f.ResetMidBody)
	case r.Method == "GET" && name == "":
		sv.list(w, resource, q, f.ResetMidBody)
	case r.Method == "GET":
		sv.get(w, resource, ns, name, f.ResetMidBody)
	case r.Method == "POST" && sub == "binding":
		sv.bind(w, r, ns, name)
	case r.Method == "POST" && name == "":
		sv.create(w, r, resource, ns)
	case r.Method == "PUT" && name != "":
		sv.update(w, r, resource, ns, name)
	case r.Method == "PATCH" && name != "":
		sv.patch(w, r, resource, ns, name)
	case r.Method == "DELETE" && name != "":
		sv.remove(w, resource, ns, name)
	default:
		writeError(w, &apiError{405, "MethodNotAllowed", "method not allowed"})
	}
}

// parsePath: /api/v1/[namespaces/NS/]RESOURCE[/NAME[/SUB]] and the same under
// /apis/coordination.k8s.io/v1 for leases.
func parsePath(path string) (resource, ns, name, sub string, ok bool) {
	var rest string
	switch {
	case strings.HasPrefix(path, "/api/v1/"):
		rest = path[len("/api/v1/"):]
	case strings.HasPrefix(path, "/apis/coordination.k8s.io/v1/"):
		rest = path[len("/apis/coordination.k8s.io/v1/"):]
	default:
		return "", "", "", "", false
	}
	parts := strings.Split(strings.Trim(rest, "/"), "/")
	if len(parts) >= 3 && parts[0] == "namespaces" {
		ns, parts = parts[1], parts[2:]
	}
	resource = parts[0]
	if len(parts) > 1 {
		name = parts[1]
	}
	if len(parts) > 2 {
		sub = parts[2]
	}
	_, known := map[string]bool{"nodes": true, "pods": true, "events": true, "leases": true}[resource]
	return resource, ns, name, sub, known && len(parts) <= 3
}

func key(ns, name string) string { return ns + "/" + name }

func selector(q url.Values) (*string, error) {
	fs := ""
	if v := q["fieldSelector"]; len(v) > 0 {
		fs = v[0]
	}
	if fs == "" {
		return nil, nil
	}
	if !strings.HasPrefix(fs, "spec.nodeName=") {
		return nil, &apiError{400, "BadRequest", "field selector not supported here: " + fs}
	}
	node := fs[len("spec.nodeName="):]
	return &node, nil
}

// writeBody answers a read with `body`, or (reset) with its first half and a reset: the
// handler aborts, and net/http resets the HTTP/2 stream (closes an HTTP/1.1 connection).
func writeBody(w http.ResponseWriter, body []byte, reset bool) {
	w.Header().Set("Content-Type", "application/json")
	if !reset {
		w.Write(body)
		return
	}
	w.Write(body[:len(body)/2])
	w.(http.Flusher).Flush()
	panic(http.ErrAbortHandler)
}

func (sv *server) list(w http.ResponseWriter, resource string, q url.Values, reset bool) {
	node, err := selector(q)
	if err != nil {
		writeError(w, err)
		return
	}
	sv.s.mu.Lock()
	items := make([]object, 0, len(sv.s.objects[resource]))
	for _, o := range sv.s.objects[resource] {
		if node == nil || nodeName(o) == *node {
			items = append(items, o)
		}
	}
	rv := sv.s.rv
	body, _ := json.Marshal(object{"kind": "List", "apiVersion": "v1",
		"metadata": object{"resourceVersion": strconv.FormatUint(rv, 10)}, "items": items})
	sv.s.mu.Unlock()
	writeBody(w, body, reset)
}

// stored is the object at ns/name (under s.mu), or a 404 for the client.
func (s *store) stored(resource, ns, name string) (object, error) {
	o, ok := s.objects[resource][key(ns, name)]
	if !ok {
		return nil, &apiError{404, "NotFound", fmt.Sprintf("%s %q not found", resource, name)}
	}
	return o, nil
}

func (sv *server) get(w http.ResponseWriter, resource, ns, name string, reset bool) {
	sv.s.mu.Lock()
	o, err := sv.s.stored(resource, ns, name)
	var body []byte
	if err == nil {
		body, _ = json.Marshal(o)
	}
	sv.s.mu.Unlock()
	if err != nil {
		writeError(w, err)
		return
	}
	writeBody(w, body, reset)
}

func readObject(r *http.Request) (object, error) {
	var o object
	if err := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 3<<20)).Decode(&o); err != nil || o == nil {
		return nil, &apiError{400, "BadRequest", "the body is not a JSON object"}
	}
	return o, nil
}

// copyObject is a deep copy by JSON (stored objects are never changed in place: a watch
// event or a list being written may hold them).
func copyObject(o object) object {
	raw, _ := json.Marshal(o)
	var c object
	json.Unmarshal(raw, &c)
	return c
}

func (sv *server) create(w http.ResponseWriter, r *http.Request, resource, ns string) {
	o, err := readObject(r)
	if err != nil {
		writeError(w, err)
		return
	}
	m := meta(o)
	name := str(m, "name")
	if name == "" && str(m, "generateName") != "" {
		name = fmt.Sprintf("%s%05x", str(m, "generateName"), atomic.AddUint64(&generated, 1))
		m["name"] = name
	}
	if name == "" {
		writeError(w, &apiError{422, "Invalid", "metadata.name: Required value"})
		return
	}
	if ns != "" {
		m["namespace"] = ns
	}
	m["uid"] = fmt.Sprintf("%x", time.Now().UnixNano())
	m["creationTimestamp"] = time.Now().UTC().Format(time.RFC3339)
	sv.s.mu.Lock()
	defer sv.s.mu.Unlock()
	if _, exists := sv.s.objects[resource][key(ns, name)]; exists {
		writeError(w, &apiError{409, "AlreadyExists", fmt.Sprintf("%s %q already exists", resource, name)})
		return
	}
	writeJSON(w, 201, sv.s.commit(resource, "ADDED", key(ns, name), o, nil))
}

func (sv *server) update(w http.ResponseWriter, r *http.Request, resource, ns, name string) {
	o, err := readObject(r)
	if err != nil {
		writeError(w, err)
		return
	}
	sv.s.mu.Lock()
	defer sv.s.mu.Unlock()
	current, err := sv.s.stored(resource, ns, name)
	if err != nil {
		writeError(w, err)
		return
	}
	if want := str(meta(o), "resourceVersion"); want != "" && want != str(meta(current), "resourceVersion") {
		writeError(w, &apiError{409, "Conflict", fmt.Sprintf("Operation cannot be fulfilled on %s %q: "+
			"the object has been modified; please apply your changes to the latest version and try again", resource, name)})
		return
	}
	for _, k := range []string{"uid", "creationTimestamp", "namespace", "name"} {
		if v, ok := meta(current)[k]; ok {
			meta(o)[k] = v
		}
	}
	writeJSON(w, 200, sv.s.commit(resource, "MODIFIED", key(ns, name), o, current))
}

// merge applies a JSON merge patch (RFC 7386; strategic merge approximated by it, as the
// project's simulator does).
func merge(target object, patch object) object {
	for k, v := range patch {
		if v == nil {
			delete(target, k)
			continue
		}
		if pv, ok := v.(object); ok {
			tv, _ := target[k].(object)
			if tv == nil {
				tv = object{}
			}
			target[k] = merge(tv, pv)
			continue
		}
		target[k] = v
	}
	return target
}

func (sv *server) patch(w http.ResponseWriter, r *http.Request, resource, ns, name string) {
	p, err := readObject(r)
	if err != nil {
		writeError(w, err)
		return
	}
	sv.s.mu.Lock()
	defer sv.s.mu.Unlock()
	current, err := sv.s.stored(resource, ns, name)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, 200, sv.s.commit(resource, "MODIFIED", key(ns, name), merge(copyObject(current), p), current))
}

func (sv *server) remove(w http.ResponseWriter, resource, ns, name string) {
	sv.s.mu.Lock()
	defer sv.s.mu.Unlock()
	current, err := sv.s.stored(resource, ns, name)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, 200, sv.s.commit(resource, "DELETED", key(ns, name), copyObject(current), current))
}

func (sv *server) bind(w http.ResponseWriter, r *http.Request, ns, name string) {
	b, err := readObject(r)
	if err != nil {
		writeError(w, err)
		return
	}
	target, _ := b["target"].(object)
	node := str(target, "name")
	sv.s.mu.Lock()
	defer sv.s.mu.Unlock()
	current, err := sv.s.stored("pods", ns, name)
	if err != nil {
		writeError(w, err)
		return
	}
	if nodeName(current) != "" {
		writeError(w, &apiError{409, "Conflict", fmt.Sprintf("pod %s is already assigned to node %q", name, nodeName(current))})
		return
	}
	pod := copyObject(current)
	spec, _ := pod["spec"].(object)
	if spec == nil {
		spec = object{}
		pod["spec"] = spec
	}
	spec["nodeName"] = node
	sv.s.commit("pods", "MODIFIED", key(ns, name), pod, current)
	writeJSON(w, 201, object{"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201})
}

func (sv *server) watch(w http.ResponseWriter, r *http.Request, resource string, q url.Values, reset bool) {
	node, err := selector(q)
	if err != nil {
		writeError(w, err)
		return
	}
	flusher, _ := w.(http.Flusher)
	timeout := 30 * time.Minute
	if t, err := strconv.Atoi(q.Get("timeoutSeconds")); err == nil && t > 0 {
		timeout = time.Duration(t) * time.Second
	}
	bookmarks := q.Get("allowWatchBookmarks") == "true"
	wt := &watcher{resource: resource, node: node, ch: make(chan []byte, 10000)}
	s := sv.s
	s.mu.Lock()
	rv, _ := strconv.ParseUint(q.Get("resourceVersion"), 10, 64)
	if rv != 0 && rv < s.oldest()-1 {
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(200)
		w.Write(eventLine("ERROR", object{"kind": "Status", "apiVersion": "v1", "status": "Failure",
			"reason": "Expired", "code": 410, "message": fmt.Sprintf("too old resource version: %d (%d)", rv, s.oldest()-1)}))
		return
	}
	if rv == 0 { // the current state as ADDED, then what follows
		for _, o := range s.objects[resource] {
			if node == nil || nodeName(o) == *node {
				s.send(wt, eventLine("ADDED", o))
			}
		}
	} else {
		n := len(s.history)
		for i := 0; i < n; i++ {
			c := s.history[(s.next+i)%n]
			if c != nil && c.rv > rv {
				s.offer(wt, c)
			}
		}
	}
	if !wt.dropped {
		s.watchers[wt] = struct{}{}
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if _, still := s.watchers[wt]; still {
			delete(s.watchers, wt)
		}
		s.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(200)
	if flusher != nil {
		flusher.Flush()
	}
	end := time.NewTimer(timeout)
	defer end.Stop()
	tick := time.NewTicker(*bookmarkEach)
	defer tick.Stop()
	for {
		select {
		case line, open := <-wt.ch:
			if !open {
				return
			}
			if _, err := w.Write(line); err != nil {
				return
			}
			for more := len(wt.ch); more > 0; more-- { // what queued meanwhile, in one write
				if line, open = <-wt.ch; !open {
					break
				}
				w.Write(line)
			}
			if flusher != nil {
				flusher.Flush()
			}
			if reset { // the first events, then a reset (writeBody)
				panic(http.ErrAbortHandler)
			}
		case <-tick.C:
			if bookmarks {
				s.mu.Lock()
				now := strconv.FormatUint(s.rv, 10)
				s.mu.Unlock()
				w.Write(eventLine("BOOKMARK", object{"kind": "Pod", "apiVersion": "v1",
					"metadata": object{"resourceVersion": now}}))
				if flusher != nil {
					flusher.Flush()
				}
			}
		case <-end.C:
			return
		case <-r.Context().Done():
			return
		}
	}
}

func pool(file string) *x509.CertPool {
	if file == "" {
		return nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		log.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pem) {
		log.Fatalf("%s: no certificate", file)
	}
	return p
}

// ---- the groups and their fault switches ------------------------------------------------

// faults are a group's switches (the simulator's names, the ones the day with faults sets).
type faults struct {
	StatusOverride int  `json:"status_override"`
	ResetMidBody   bool `json:"reset_mid_body"`
}

// group is one group's port: its server (nil while down), its faults, its connections.
type group struct {
	addr   string
	sv     *server
	tls    *tls.Config
	served atomic.Uint64

	mu     sync.Mutex
	faults faults
	srv    *http.Server
	conns  map[net.Conn]struct{}
}

func (g *group) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.served.Add(1)
	g.mu.Lock()
	f := g.faults
	g.mu.Unlock()
	g.sv.serve(w, r, f)
}

// up binds the group's port and serves it.
func (g *group) up() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.srv != nil {
		return nil
	}
	ln, err := net.Listen("tcp", g.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: g, TLSConfig: g.tls,
		ReadHeaderTimeout: 32 * time.Second, IdleTimeout: 90 * time.Second,
		ConnState: func(c net.Conn, state http.ConnState) {
			g.mu.Lock()
			defer g.mu.Unlock()
			switch state {
			case http.StateNew:
				g.conns[c] = struct{}{}
			case http.StateClosed, http.StateHijacked:
				delete(g.conns, c)
			}
		}}
	g.srv = srv
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()
	return nil
}

// down closes the port and resets every connection, as a crashed apiserver's would be.
func (g *group) down() {
	g.mu.Lock()
	srv := g.srv
	g.srv = nil
	for c := range g.conns {
		if t, ok := c.(*tls.Conn); ok {
			c = t.NetConn()
		}
		if tcp, ok := c.(*net.TCPConn); ok {
			tcp.SetLinger(0) // a reset, not an orderly close
		}
	}
	g.conns = map[net.Conn]struct{}{}
	g.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

func (g *group) state() object {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, port, _ := net.SplitHostPort(g.addr)
	n, _ := strconv.Atoi(port)
	return object{"port": n, "down": g.srv == nil, "faults": g.faults, "total": g.served.Load()}
}

// control serves the fault switches (see the package comment).
func control(groups map[string]*group) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
		if r.Method == "GET" && r.URL.Path == "/groups" {
			all := object{}
			for name, g := range groups {
				all[name] = g.state()
			}
			writeJSON(w, 200, all)
			return
		}
		if len(parts) != 3 || parts[0] != "groups" || groups[parts[1]] == nil {
			http.Error(w, "no such group or call", 404)
			return
		}
		g := groups[parts[1]]
		switch {
		case r.Method == "PUT" && parts[2] == "faults":
			g.mu.Lock()
			f := g.faults
			g.mu.Unlock()
			decoder := json.NewDecoder(r.Body)
			decoder.DisallowUnknownFields() // a switch this stand-in lacks is an error, not a no-op
			if err := decoder.Decode(&f); err != nil {
				http.Error(w, err.Error(), 400)
				return
			}
			g.mu.Lock()
			g.faults = f
			g.mu.Unlock()
			writeJSON(w, 200, f)
		case r.Method == "POST" && parts[2] == "down":
			g.down()
			writeJSON(w, 200, object{"down": true})
		case r.Method == "POST" && parts[2] == "up":
			if err := g.up(); err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			writeJSON(w, 200, object{"down": false})
		default:
			http.Error(w, "no such call", 404)
		}
	})
}

func main() {
	flag.Parse()
	sv := &server{s: newStore(), allowed: map[string]bool{}, proxies: pool(*proxyCA)}
	for _, n := range strings.Split(*allowedNames, ",") {
		if n != "" {
			sv.allowed[n] = true
		}
	}
	clients := x509.NewCertPool()
	for _, f := range []string{*clientCA, *proxyCA} {
		if f != "" {
			pem, err := os.ReadFile(f)
			if err != nil {
				log.Fatal(err)
			}
			clients.AppendCertsFromPEM(pem)
		}
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	config := &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: clients,
		ClientAuth: tls.VerifyClientCertIfGiven, NextProtos: []string{"h2", "http/1.1"}}
	groups := map[string]*group{}
	var names []string
	for _, pair := range strings.Split(*ports, ",") {
		name, port, found := strings.Cut(pair, "=")
		if !found {
			log.Fatalf("-ports: %q is not group=port", pair)
		}
		g := &group{addr: "127.0.0.1:" + port, sv: sv, tls: config,
			conns: map[net.Conn]struct{}{}}
		if err := g.up(); err != nil {
			log.Fatal(err)
		}
		groups[name] = g
		names = append(names, name+"=127.0.0.1:"+port)
	}
	if *controlPort != 0 {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *controlPort))
		if err != nil {
			log.Fatal(err)
		}
		go http.Serve(ln, control(groups))
	}
	fmt.Printf("apiserver stand-in serving %s\n", strings.Join(names, ", "))
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	for _, g := range groups {
		g.down()
	}
}

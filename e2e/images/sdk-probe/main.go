// Command sdk-probe is the application pod of ephemera's end-to-end tests: it
// uses the identity ephemera injects exactly as an application would, through
// nothing but the AWS SDK for Go v2's default credential chain, and reports
// what it saw as JSON.
//
// Usage:
//
//	sdk-probe [--get s3://bucket/key]... [--deny s3://bucket/key]... [--kube-token]
//	          [--fetch URL]... [--unreachable URL]... [--aws=false]
//	          [--loop DURATION [--every DURATION] [--fresh-session]]
//	sdk-probe --serve ADDR
//
//	--get URI         this object must be readable (repeatable)
//	--deny URI        reading this object must fail with AccessDenied from S3, with
//	                  credentials in hand (repeatable)
//	--kube-token      the identity has kubernetes.rules: ephemera's Kubernetes API
//	                  token must be at the default path, for the pod's own
//	                  ServiceAccount (without it, that path must not exist)
//	--fetch URL       an HTTP GET of URL must get an answer (repeatable)
//	--unreachable URL an HTTP GET of URL must fail to connect (repeatable; a
//	                  NetworkPolicy at work)
//	--aws=false       no AWS and no token checks (a pod without an identity)
//	--loop D          repeat the checks until D has passed or SIGTERM/SIGINT arrives
//	                  (Deployments, the token-refresh test); 0, the default, runs one round
//	--every D         pause between rounds in a loop (default 10s)
//	--settle D        before the first round, wait up to D for every --unreachable
//	                  URL to stop answering (a NetworkPolicy engine programs a new
//	                  pod's rules shortly after it starts); the first report's
//	                  blocked_after_ms says how long that took
//	--fresh-session   load the configuration again every round, so every round
//	                  assumes the role with the token file as it is now (the SDK
//	                  otherwise keeps a session until it nears expiry)
//	--shutdown-delay D  on SIGTERM in a loop, wait D before the last round (a
//	                  shutdown hook that flushes after a moment: the pod must
//	                  keep its credentials while it terminates, not only at
//	                  the first instant)
//	--serve ADDR      answer every HTTP request with 200 "ok" until SIGTERM (a
//	                  peer for network tests); nothing else runs
//
// Environment, read by the SDK (config.LoadDefaultConfig), as ephemera's
// webhook sets it: AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE,
// AWS_ROLE_SESSION_NAME, AWS_REGION. For an emulator, the pod spec sets
// AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_STS: the SDK makes its web-identity
// STS client before it reads the base endpoint, so only the service-specific
// variable reaches that client (as for any Go application). S3 is addressed
// path-style, so an emulator needs no per-bucket DNS names.
//
// Every round, besides the --get/--deny reads, it checks that:
//   - /var/run/secrets/kubernetes.io/serviceaccount does not exist (the
//     webhook removes the default API token), or, with --kube-token, holds
//     ephemera's Kubernetes API token for the pod's own ServiceAccount, not
//     for STS, and living no longer than the STS token;
//   - $AWS_WEB_IDENTITY_TOKEN_FILE exists and holds a JWT; it reports the
//     payload's iss, aud, sub, iat and exp (the signature is not checked: STS
//     does that, and this is what the kubelet wrote, refreshed or not);
//   - sts:GetCallerIdentity answers with an assumed-role ARN of the role
//     named by AWS_ROLE_ARN.
//
// Output: one JSON object per round on stdout (round, phase, ok, caller_arn,
// token{iss,aud,sub,iat,exp}, default_token_present, kube_token{...},
// gets[{uri,ok,err}], denies[{uri,denied,err}], fetches[{url,ok,err}],
// failures, ts). Each failed expectation is also
// written to stderr with the AWS error code. On SIGTERM or SIGINT during a loop
// it runs one last round with phase "shutdown" (credentials must still work
// while a pod terminates) and exits. Exit status: 0 when every expectation of
// every round held, 1 when one failed (at once in one-shot mode, when the
// loop ends otherwise), 2 on bad usage.
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"
)

// Where the kubelet mounts the default ServiceAccount token when nothing
// removes it (the ServiceAccount admission plugin's kube-api-access volume).
const defaultTokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// One AWS call may not hold up a round longer than this; a pod being
// terminated has its grace period, not more.
const callTimeout = 10 * time.Second

type objectList []s3Object

func (l *objectList) String() string { return fmt.Sprint(*l) }

func (l *objectList) Set(uri string) error {
	obj, err := parseS3URI(uri)
	if err != nil {
		return err
	}
	*l = append(*l, obj)
	return nil
}

type s3Object struct{ uri, bucket, key string }

func parseS3URI(uri string) (s3Object, error) {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "s3" || u.Host == "" || strings.TrimPrefix(u.Path, "/") == "" {
		return s3Object{}, fmt.Errorf("%q is not s3://bucket/key", uri)
	}
	return s3Object{uri: uri, bucket: u.Host, key: strings.TrimPrefix(u.Path, "/")}, nil
}

type tokenClaims struct {
	Iss string   `json:"iss"`
	Aud []string `json:"aud"`
	Sub string   `json:"sub"`
	Iat int64    `json:"iat"`
	Exp int64    `json:"exp"`
}

type getResult struct {
	URI string `json:"uri"`
	OK  bool   `json:"ok"`
	Err string `json:"err,omitempty"`
}

type denyResult struct {
	URI    string `json:"uri"`
	Denied bool   `json:"denied"`
	Err    string `json:"err,omitempty"`
}

type fetchResult struct {
	URL       string `json:"url"`
	Reachable bool   `json:"reachable"`
	Want      bool   `json:"want_reachable"`
	Err       string `json:"err,omitempty"`
}

type report struct {
	Round               int           `json:"round"`
	Phase               string        `json:"phase"`
	OK                  bool          `json:"ok"`
	CallerARN           string        `json:"caller_arn"`
	Token               *tokenClaims  `json:"token"`
	DefaultTokenPresent bool          `json:"default_token_present"`
	KubeToken           *tokenClaims  `json:"kube_token"`
	Gets                []getResult   `json:"gets"`
	Denies              []denyResult  `json:"denies"`
	Fetches             []fetchResult `json:"fetches"`
	Failures            []string      `json:"failures"`
	BlockedAfterMs      *int64        `json:"blocked_after_ms,omitempty"`
	TS                  string        `json:"ts"`
}

type urlList []string

func (l *urlList) String() string { return fmt.Sprint(*l) }

func (l *urlList) Set(raw string) error {
	if u, err := url.Parse(raw); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%q is not an http(s) URL", raw)
	}
	*l = append(*l, raw)
	return nil
}

func (r *report) fail(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.Failures = append(r.Failures, msg)
	fmt.Fprintf(os.Stderr, "sdk-probe: round %d (%s): %s\n", r.Round, r.Phase, msg)
}

func main() {
	var gets, denies objectList
	var fetches, unreachable urlList
	flag.Var(&gets, "get", "s3://bucket/key that must be readable (repeatable)")
	flag.Var(&denies, "deny", "s3://bucket/key whose read must fail with AccessDenied (repeatable)")
	flag.Var(&fetches, "fetch", "http(s) URL that must answer (repeatable)")
	flag.Var(&unreachable, "unreachable", "http(s) URL that must not be reachable (repeatable)")
	kubeToken := flag.Bool("kube-token", false, "expect ephemera's Kubernetes API token at the default path")
	withAWS := flag.Bool("aws", true, "check the AWS identity and its token")
	loop := flag.Duration("loop", 0, "repeat the checks for this long (0: one round)")
	every := flag.Duration("every", 10*time.Second, "pause between rounds in a loop")
	fresh := flag.Bool("fresh-session", false, "load the configuration (and assume the role) again every round")
	settle := flag.Duration("settle", 0, "wait up to this long for the --unreachable URLs to be blocked")
	serveAddr := flag.String("serve", "", "serve HTTP 200 \"ok\" on this address until SIGTERM")
	shutdownDelay := flag.Duration("shutdown-delay", 0, "on SIGTERM in a loop, wait this long before the last round")
	flag.Parse()
	if flag.NArg() > 0 || *loop < 0 || *every <= 0 || *settle < 0 || *shutdownDelay < 0 {
		flag.Usage()
		os.Exit(2)
	}

	// Caught from the start, so a SIGTERM during the first round still gets
	// its shutdown round instead of killing the process.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	if *serveAddr != "" {
		serve(*serveAddr, stop)
		return
	}

	blockedAfter := waitBlocked(unreachable, *settle)
	ctx := context.Background()
	p := probe{
		gets:         gets,
		denies:       denies,
		fetches:      fetches,
		blocked:      unreachable,
		kubeToken:    *kubeToken,
		aws:          *withAWS,
		fresh:        *fresh,
		out:          json.NewEncoder(os.Stdout),
		blockedAfter: blockedAfter,
	}
	if p.aws {
		if err := p.connect(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "sdk-probe: loading the AWS configuration: %v\n", err)
			os.Exit(1)
		}
	}

	allOK := true
	if *loop == 0 {
		allOK = p.round(ctx, 1, "once")
		exit(allOK)
	}
	deadline := time.After(*loop)
	for n := 1; ; n++ {
		allOK = p.round(ctx, n, "loop") && allOK
		select {
		case sig := <-stop:
			fmt.Fprintf(os.Stderr, "sdk-probe: %v: one last round in %v\n", sig, *shutdownDelay)
			time.Sleep(*shutdownDelay)
			allOK = p.round(ctx, n+1, "shutdown") && allOK
			exit(allOK)
		case <-deadline:
			exit(allOK)
		case <-time.After(*every):
		}
	}
}

func exit(ok bool) {
	if ok {
		os.Exit(0)
	}
	os.Exit(1)
}

type probe struct {
	sts              *sts.Client
	s3               *s3.Client
	gets, denies     objectList
	fetches, blocked urlList
	kubeToken        bool
	aws, fresh       bool
	// How long the --unreachable URLs took to be blocked (first report only).
	blockedAfter *int64
	out          *json.Encoder
}

// connect makes the clients from the SDK's default configuration: the
// credential chain finds the web identity in the environment.
func (p *probe) connect(ctx context.Context) error {
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		return err
	}
	p.sts = sts.NewFromConfig(cfg)
	p.s3 = s3.NewFromConfig(cfg, func(o *s3.Options) { o.UsePathStyle = true })
	return nil
}

// round runs every check once, prints its report and says whether all held.
func (p *probe) round(ctx context.Context, n int, phase string) bool {
	r := report{
		Round: n, Phase: phase, Gets: []getResult{}, Denies: []denyResult{}, Fetches: []fetchResult{},
		Failures: []string{},
	}
	if n == 1 {
		r.BlockedAfterMs = p.blockedAfter
	}
	p.checkNetwork(&r)
	if !p.aws {
		return p.finish(&r)
	}
	if p.fresh && n > 1 {
		if err := p.connect(ctx); err != nil {
			r.fail("loading the AWS configuration again: %v", err)
			return p.finish(&r)
		}
	}

	if claims, err := readToken(os.Getenv("AWS_WEB_IDENTITY_TOKEN_FILE")); err != nil {
		r.fail("web identity token: %v", err)
	} else {
		r.Token = claims
	}
	p.checkKubeToken(&r)

	callCtx, cancel := context.WithTimeout(ctx, callTimeout)
	id, err := p.sts.GetCallerIdentity(callCtx, &sts.GetCallerIdentityInput{})
	cancel()
	if err != nil {
		r.fail("sts:GetCallerIdentity: %s", describe(err))
	} else {
		r.CallerARN = aws.ToString(id.Arn)
		if want := roleName(os.Getenv("AWS_ROLE_ARN")); !strings.Contains(r.CallerARN, ":assumed-role/"+want+"/") {
			r.fail("caller %s is not a session of role %q (AWS_ROLE_ARN)", r.CallerARN, want)
		}
	}

	for _, obj := range p.gets {
		err := p.read(ctx, obj)
		res := getResult{URI: obj.uri, OK: err == nil}
		if err != nil {
			res.Err = describe(err)
			r.fail("get %s: %s", obj.uri, res.Err)
		}
		r.Gets = append(r.Gets, res)
	}
	for _, obj := range p.denies {
		err := p.read(ctx, obj)
		res := denyResult{URI: obj.uri, Denied: deniedByS3(err)}
		switch {
		case err == nil:
			r.fail("deny %s: the read succeeded", obj.uri)
		case !res.Denied:
			res.Err = describe(err)
			r.fail("deny %s: expected AccessDenied from S3 GetObject, got %s", obj.uri, res.Err)
		default:
			res.Err = describe(err)
		}
		r.Denies = append(r.Denies, res)
	}
	return p.finish(&r)
}

// finish prints the report and says whether every expectation held.
func (p *probe) finish(r *report) bool {
	r.OK = len(r.Failures) == 0
	r.TS = time.Now().UTC().Format(time.RFC3339Nano)
	if err := p.out.Encode(r); err != nil {
		fmt.Fprintf(os.Stderr, "sdk-probe: writing the report: %v\n", err)
		return false
	}
	return r.OK
}

// checkKubeToken: the default token path holds ephemera's Kubernetes API
// token for the pod's own ServiceAccount when the identity has
// kubernetes.rules, and does not exist otherwise.
func (p *probe) checkKubeToken(r *report) {
	_, err := os.Stat(defaultTokenDir)
	switch {
	case err != nil && !errors.Is(err, os.ErrNotExist):
		r.fail("checking %s: %v", defaultTokenDir, err)
		return
	case err != nil && p.kubeToken:
		r.fail("%s does not exist: ephemera's Kubernetes API token is missing", defaultTokenDir)
		return
	case err != nil:
		return
	}
	r.DefaultTokenPresent = true
	if !p.kubeToken {
		r.fail("%s exists: a Kubernetes API token is mounted, and this identity has no kubernetes.rules", defaultTokenDir)
		return
	}
	claims, err := readToken(defaultTokenDir + "/token")
	if err != nil {
		r.fail("Kubernetes API token: %v", err)
		return
	}
	r.KubeToken = claims
	if r.Token != nil && claims.Sub != r.Token.Sub {
		r.fail("the Kubernetes API token is for %s, not the pod's own ServiceAccount %s", claims.Sub, r.Token.Sub)
	}
	if r.Token != nil && claims.Exp-claims.Iat > r.Token.Exp-r.Token.Iat {
		r.fail("the Kubernetes API token lives %ds, longer than the STS token's %ds",
			claims.Exp-claims.Iat, r.Token.Exp-r.Token.Iat)
	}
	for _, aud := range claims.Aud {
		if aud == "sts.amazonaws.com" {
			r.fail("the Kubernetes API token carries the STS audience")
		}
	}
}

// waitBlocked polls every URL until none answers or `limit` has passed; how
// long that took (nil without URLs or a limit). What is still reachable then
// fails the first round.
func waitBlocked(urls urlList, limit time.Duration) *int64 {
	if len(urls) == 0 || limit <= 0 {
		return nil
	}
	client := &http.Client{Timeout: 200 * time.Millisecond}
	start := time.Now()
	for time.Since(start) < limit {
		open := false
		for _, u := range urls {
			if resp, err := client.Get(u); err == nil {
				resp.Body.Close()
				open = true
			}
		}
		if !open {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	ms := time.Since(start).Milliseconds()
	return &ms
}

// checkNetwork: each --fetch URL answers over HTTP, each --unreachable URL
// cannot be connected to.
func (p *probe) checkNetwork(r *report) {
	client := &http.Client{Timeout: 3 * time.Second}
	get := func(u string) error {
		resp, err := client.Get(u)
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}
	for _, u := range p.fetches {
		err := get(u)
		res := fetchResult{URL: u, Reachable: err == nil, Want: true}
		if err != nil {
			res.Err = err.Error()
			r.fail("fetch %s: %v", u, err)
		}
		r.Fetches = append(r.Fetches, res)
	}
	for _, u := range p.blocked {
		err := get(u)
		res := fetchResult{URL: u, Reachable: err == nil, Want: false}
		if err == nil {
			r.fail("%s answered: it must not be reachable", u)
		} else {
			res.Err = err.Error()
		}
		r.Fetches = append(r.Fetches, res)
	}
}

// serve answers 200 "ok" until a signal arrives.
func serve(addr string, stop <-chan os.Signal) {
	server := &http.Server{
		Addr:              addr,
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, "ok\n")
		}),
	}
	go func() {
		<-stop
		_ = server.Close()
	}()
	if err := server.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "sdk-probe: serving %s: %v\n", addr, err)
		os.Exit(1)
	}
}

// read fetches the whole object: a GetObject that answers 200 but fails
// mid-body is not a successful read.
func (p *probe) read(ctx context.Context, obj s3Object) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	out, err := p.s3.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(obj.bucket), Key: aws.String(obj.key)})
	if err != nil {
		return err
	}
	defer out.Body.Close()
	_, err = io.Copy(io.Discard, out.Body)
	return err
}

// readToken decodes the payload of the JWT in path, without verifying it.
func readToken(path string) (*tokenClaims, error) {
	if path == "" {
		return nil, errors.New("AWS_WEB_IDENTITY_TOKEN_FILE is not set")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	parts := strings.Split(strings.TrimSpace(string(raw)), ".")
	if len(parts) != 3 {
		return nil, fmt.Errorf("%s holds no JWT (%d dot-separated parts)", path, len(parts))
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return nil, fmt.Errorf("%s: payload is not base64url: %w", path, err)
	}
	// `aud` is a string or a list of strings (RFC 7519 section 4.1.3);
	// Kubernetes writes a list.
	var claims struct {
		tokenClaims
		Aud json.RawMessage `json:"aud"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return nil, fmt.Errorf("%s: payload is not JSON: %w", path, err)
	}
	var one string
	if json.Unmarshal(claims.Aud, &one) == nil {
		claims.tokenClaims.Aud = []string{one}
	} else if err := json.Unmarshal(claims.Aud, &claims.tokenClaims.Aud); err != nil {
		return nil, fmt.Errorf("%s: aud is neither a string nor a list of strings", path)
	}
	return &claims.tokenClaims, nil
}

// roleName: arn:aws:iam::123456789012:role/some/path/name -> name, the part
// an assumed-role ARN keeps.
func roleName(arn string) string {
	return arn[strings.LastIndex(arn, "/")+1:]
}

// deniedByS3: S3 itself refused GetObject with AccessDenied. An AccessDenied
// from AssumeRoleWithWebIdentity, on the way to credentials, says nothing
// about the object's policy and must not pass as a deny.
func deniedByS3(err error) bool {
	if errorCode(err) != "AccessDenied" {
		return false
	}
	var innermost *smithy.OperationError
	for e := err; e != nil; e = errors.Unwrap(e) {
		if op, ok := e.(*smithy.OperationError); ok {
			innermost = op
		}
	}
	return innermost != nil && innermost.Service() == "S3" && innermost.Operation() == "GetObject"
}

func errorCode(err error) string {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode()
	}
	return ""
}

// describe puts the AWS error code first, then the SDK's whole message, which
// names the operation that failed (AssumeRoleWithWebIdentity when the
// credentials could not be had, GetObject, ...), the HTTP status and the
// request id.
func describe(err error) string {
	if code := errorCode(err); code != "" {
		return code + ": " + err.Error()
	}
	return err.Error()
}

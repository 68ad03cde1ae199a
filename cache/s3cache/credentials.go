package s3cache

import (
	"os"
	"strings"
	"sync"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Credentials come, in this order, from: the Options' static keys; the
// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
// AWS_SESSION_TOKEN, else MINIO_ROOT_USER and MINIO_ROOT_PASSWORD); the
// shared credentials and config files (AWS_SHARED_CREDENTIALS_FILE and
// AWS_CONFIG_FILE, default ~/.aws/credentials and ~/.aws/config) with the
// profile of Options.Profile, AWS_PROFILE or "default"; a web identity
// token (AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN); container
// credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI); and,
// for an AWS endpoint, the instance metadata service. Without any, access
// is anonymous. The first source that yields keys is used, and errors
// name it: refused credentials say where they came from, and an anonymous
// request refused says that none were found and where they were looked
// for.

// source is one place credentials may come from.
type source struct {
	name string
	p    credentials.Provider
}

// chain is a credentials.Provider over sources that remembers which one
// served.
type chain struct {
	sources []source

	mu   sync.Mutex
	curr *source
}

func (c *chain) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	for i := range c.sources {
		s := &c.sources[i]
		v, err := s.p.RetrieveWithCredContext(cc)
		if err != nil || (v.AccessKeyID == "" && v.SecretAccessKey == "") {
			continue
		}
		c.mu.Lock()
		c.curr = s
		c.mu.Unlock()
		return v, nil
	}
	c.mu.Lock()
	c.curr = nil
	c.mu.Unlock()
	return credentials.Value{SignerType: credentials.SignatureAnonymous}, nil
}

func (c *chain) Retrieve() (credentials.Value, error) { return c.RetrieveWithCredContext(nil) }

func (c *chain) IsExpired() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.curr == nil || c.curr.p.IsExpired()
}

// used names the source of the credentials in use, "" when anonymous.
func (c *chain) used() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.curr == nil {
		return ""
	}
	return c.curr.name
}

// tried lists the sources, for an error that found none.
func (c *chain) tried() string {
	var names []string
	for _, s := range c.sources {
		names = append(names, s.name)
	}
	return strings.Join(names, ", ")
}

// newChain is the credential chain of opts (see above).
func newChain(opts Options) *chain {
	if opts.AccessKey != "" || opts.SecretKey != "" {
		return &chain{sources: []source{{"the options' keys", &credentials.Static{Value: credentials.Value{
			AccessKeyID: opts.AccessKey, SecretAccessKey: opts.SecretKey, SessionToken: opts.SessionToken, SignerType: credentials.SignatureV4,
		}}}}}
	}
	profile := opts.Profile
	if profile == "" {
		profile = os.Getenv("AWS_PROFILE")
	}
	if profile == "" {
		profile = "default"
	}
	c := &chain{sources: []source{
		{"the environment (AWS_ACCESS_KEY_ID)", &credentials.EnvAWS{}},
		{"the environment (MINIO_ROOT_USER)", &credentials.EnvMinio{}},
		{"the shared credentials file (profile " + profile + ")", &credentials.FileAWSCredentials{Profile: profile}},
	}}
	_, webIdentity := os.LookupEnv("AWS_WEB_IDENTITY_TOKEN_FILE")
	_, relative := os.LookupEnv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
	_, full := os.LookupEnv("AWS_CONTAINER_CREDENTIALS_FULL_URI")
	switch {
	case webIdentity:
		c.sources = append(c.sources, source{"a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)", &credentials.IAM{}})
	case relative || full:
		c.sources = append(c.sources, source{"container credentials (AWS_CONTAINER_CREDENTIALS_*)", &credentials.IAM{}})
	case strings.HasSuffix(opts.Endpoint, "amazonaws.com"):
		// Only AWS has an instance metadata service worth asking; elsewhere
		// asking would cost a timeout on every anonymous start.
		c.sources = append(c.sources, source{"the instance metadata service", &credentials.IAM{}})
	}
	return c
}

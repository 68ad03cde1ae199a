package main

import (
	"context"
	"io"
	"log/slog"
)

// newLogger is the logger of a command: text on w, every error attribute
// in the product's words (cliText), as the command's own messages are.
func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(productWords{slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})})
}

// productWords rewrites error values of log records with cliText.
type productWords struct{ slog.Handler }

func (h productWords) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(cleanAttr(a))
		return true
	})
	return h.Handler.Handle(ctx, out)
}

func (h productWords) WithAttrs(as []slog.Attr) slog.Handler {
	clean := make([]slog.Attr, len(as))
	for i, a := range as {
		clean[i] = cleanAttr(a)
	}
	return productWords{h.Handler.WithAttrs(clean)}
}

func (h productWords) WithGroup(name string) slog.Handler {
	return productWords{h.Handler.WithGroup(name)}
}

func cleanAttr(a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindAny {
		if err, ok := a.Value.Any().(error); ok && err != nil {
			return slog.String(a.Key, cliText(err))
		}
	}
	return a
}

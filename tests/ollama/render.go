// Renders an Ollama Modelfile's TEMPLATE the way Ollama's chat endpoint does, for modelpack's tests.
//
// Reads {"modelfile": TEXT, "conversations": [[{"role": R, "content": C}, ...], ...]} on stdin and writes
// {"commands": [[NAME, ARGS], ...], "prompts": [PROMPT, ...]} on stdout. It parses the Modelfile with the rules of
// Ollama's parser (parser/parser.go), prepends the SYSTEM default when a conversation opens without a system
// message (server/routes.go, ChatHandler), merges consecutive messages of one role and collects the system text
// (template/template.go, collate), and executes the TEMPLATE with Go's own text/template as Ollama does: option
// missingkey=zero, its "json" function, and the data of its messages path. Written for modelpack from Ollama's
// documented behaviour; only the standard library is used, so it builds offline.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/template"
)

type Message struct {
	Role      string
	Content   string
	Thinking  string
	Images    []string
	ToolCalls []any
	ToolName  string
}

type Input struct {
	Modelfile     string `json:"modelfile"`
	Conversations [][]struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"conversations"`
}

type Output struct {
	Commands [][2]string `json:"commands"`
	Prompts  []string    `json:"prompts"`
}

type state int

const (
	stateNil state = iota
	stateName
	stateValue
	stateParameter
	stateComment
)

func isSpace(r rune) bool   { return r == ' ' || r == '\t' }
func isNewline(r rune) bool { return r == '\r' || r == '\n' }
func isAlpha(r rune) bool   { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }

// unquote: a value is bare, "quoted" or """triple quoted"""; an unterminated quote is not a value yet.
func unquote(s string) (string, bool) {
	if len(s) >= 3 && s[:3] == `"""` {
		if len(s) >= 6 && s[len(s)-3:] == `"""` {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if len(s) >= 1 && s[0] == '"' {
		if len(s) >= 2 && s[len(s)-1] == '"' {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

// parseModelfile: one command per line (NAME VALUE, PARAMETER KEY VALUE, # comment); a value ends at the first
// line end where it unquotes; characters that are not printable, other than spaces and line ends inside a
// quoted value, are dropped, as Ollama's parser drops them.
func parseModelfile(text string) ([][2]string, error) {
	var commands [][2]string
	var b strings.Builder
	var name string
	curr := stateNil
	flush := func() error {
		s, ok := unquote(strings.TrimSpace(b.String()))
		if !ok {
			return errors.New("unterminated quoted value of " + name)
		}
		commands = append(commands, [2]string{name, s})
		return nil
	}
	for _, r := range text {
		next := curr
		write := r
		switch curr {
		case stateNil:
			switch {
			case r == '#':
				next, write = stateComment, 0
			case isSpace(r), isNewline(r):
				write = 0
			default:
				next = stateName
			}
		case stateName:
			switch {
			case isAlpha(r):
			case isSpace(r):
				next, write = stateValue, 0
			default:
				return nil, fmt.Errorf("invalid command name %q", b.String()+string(r))
			}
		case stateParameter:
			switch {
			case isAlpha(r), r >= '0' && r <= '9', r == '_':
			case isSpace(r):
				next, write = stateValue, 0
			default:
				return nil, fmt.Errorf("invalid parameter name %q", b.String()+string(r))
			}
		case stateValue:
			if isNewline(r) || isSpace(r) {
				next = stateNil
			}
		case stateComment:
			write = 0
			if isNewline(r) {
				next = stateNil
			}
		}
		if next != curr {
			switch curr {
			case stateName:
				name = strings.ToLower(b.String())
				switch name {
				case "from", "template", "system", "license", "adapter", "message":
				case "parameter":
					next = stateParameter
				default:
					return nil, fmt.Errorf("unknown command %q", name)
				}
			case stateParameter:
				name = b.String()
			case stateValue:
				s, ok := unquote(strings.TrimSpace(b.String()))
				if !ok || isSpace(r) {
					b.WriteRune(r)
					continue
				}
				commands = append(commands, [2]string{name, s})
			}
			b.Reset()
			curr = next
		}
		if write != 0 && strconv.IsPrint(write) {
			b.WriteRune(write)
		}
	}
	switch curr {
	case stateValue:
		if err := flush(); err != nil {
			return nil, err
		}
	case stateNil, stateComment:
	default:
		return nil, errors.New("unexpected end of Modelfile")
	}
	return commands, nil
}

// collate: consecutive messages of one role become one (joined by a blank line); the system text is every system
// message joined the same way.
func collate(messages []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range messages {
		if messages[i].Role == "system" {
			system = append(system, messages[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == messages[i].Role && messages[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + messages[i].Content
		} else {
			collated = append(collated, &messages[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func run() error {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		return err
	}
	commands, err := parseModelfile(in.Modelfile)
	if err != nil {
		return err
	}
	var source, defaultSystem string
	for _, c := range commands {
		switch c[0] {
		case "template":
			source = c[1]
		case "system":
			defaultSystem = c[1]
		}
	}
	// Only Ollama's messages path is mimicked: a template without .Messages would take its legacy path.
	if !strings.Contains(source, ".Messages") {
		return errors.New("the TEMPLATE does not use .Messages")
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(source)
	if err != nil {
		return err
	}
	out := Output{Commands: commands, Prompts: []string{}}
	for _, conversation := range in.Conversations {
		var messages []Message
		for _, m := range conversation {
			messages = append(messages, Message{Role: m.Role, Content: m.Content})
		}
		if len(messages) > 0 && messages[0].Role != "system" && defaultSystem != "" {
			messages = append([]Message{{Role: "system", Content: defaultSystem}}, messages...)
		}
		system, collated := collate(messages)
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{
			"System": system, "Messages": collated, "Tools": nil, "Response": "", "Think": false,
			"IsThinkSet": false, "Query": "", "Document": "", "Instruction": "",
		})
		if err != nil {
			return err
		}
		out.Prompts = append(out.Prompts, b.String())
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

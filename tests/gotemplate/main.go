// Renders Ollama TEMPLATEs with Go's text/template, the engine Ollama itself uses.
// Input on stdin: a JSON list of {"template": "...", "system": "...", "messages": [{"role": "...", "content": "..."}]};
// output: a JSON list of {"text": "..."} or {"error": "..."}, one per input, so a test renders many in one process.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

type Output struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

func render(in Input) Output {
	tmpl, err := template.New("t").Parse(in.Template)
	if err != nil {
		return Output{Error: err.Error()}
	}
	var out strings.Builder
	data := map[string]any{"System": in.System, "Messages": in.Messages}
	if err := tmpl.Execute(&out, data); err != nil {
		return Output{Error: err.Error()}
	}
	return Output{Text: out.String()}
}

func main() {
	var inputs []Input
	if err := json.NewDecoder(os.Stdin).Decode(&inputs); err != nil {
		panic(err)
	}
	outputs := make([]Output, len(inputs))
	for i, in := range inputs {
		outputs[i] = render(in)
	}
	if err := json.NewEncoder(os.Stdout).Encode(outputs); err != nil {
		panic(err)
	}
}

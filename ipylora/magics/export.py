"""%lora_save and %lora_export: take an adapter, a merged model, a GGUF file or a training script out of the notebook."""

from __future__ import annotations

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ipylora.engine import get_session
from ipylora.engine.export import data_path
from ipylora.magics.args import parse
from ipylora.magics.common import user_errors


@magics_class
class ExportMagics(Magics):
    """%lora_save, %lora_export."""

    @magic_arguments()
    @argument("name", help="Adapter (or run) name.")
    @argument("path", help="Folder to write.")
    @argument("-m", "--merge", action="store_true",
              help="Write base + adapter merged into one plain model (loads with AutoModelForCausalLM alone).")
    @argument("-d", "--dtype", default=None, help="With --merge: bf16, fp16 or fp32 (default: the precision the run trained in).")
    @argument("-g", "--gguf", action="store_true",
              help="Write base + adapter merged as one GGUF file (llama.cpp, Ollama, LM Studio) with the training "
                   "template as its chat template, and an Ollama Modelfile beside it. PATH: a folder or a .gguf file.")
    @argument("-q", "--quant", default=None, help="With --gguf: f16 (default), bf16, q8_0 or q4_0.")
    @argument("--output", default="runs", help="Folder that holds runs/<name>/.")
    @line_magic
    @user_errors
    def lora_save(self, line):
        """Save an adapter in standard PEFT format, with --merge a merged full model, with --gguf one GGUF
        file + Ollama Modelfile (a 4-bit base is dequantized first, never merged into 4-bit weights).

            %lora_save sd-prompts exported/sd-prompts
            %lora_save sd-prompts exported/sd-prompts-merged --merge --dtype bf16
            %lora_save sd-prompts exported/gguf --gguf --quant q8_0
        """
        opts = parse(self.lora_save, line)
        if opts.gguf or opts.quant:
            files = get_session().save(opts.name, opts.path, merge=opts.merge, dtype=opts.dtype, output=opts.output,
                                       gguf=opts.gguf, quant=opts.quant)
            print(f"GGUF ({files.quant}) saved to {files.gguf}, Modelfile beside it: run it with llama.cpp "
                  f"(llama-cli -m {files.gguf}), or with Ollama: ollama create {opts.name} -f {files.modelfile}")
            for note in files.notes:
                print(note)
            return
        path = get_session().save(opts.name, opts.path, merge=opts.merge, dtype=opts.dtype, output=opts.output)
        what = "merged model" if opts.merge else "adapter (PEFT)"
        load = ("AutoModelForCausalLM.from_pretrained" if opts.merge else "PeftModel.from_pretrained(base, ...)")
        print(f"{what} saved to {path}; load it with {load}")

    @magic_arguments()
    @argument("name", help="Run name.")
    @argument("-s", "--script", required=True, help="Path of the Python script to write, e.g. train.py.")
    @argument("--data", default=None, help="The table the dataset was made from (csv/tsv/json/jsonl), which the script "
                                           "reads and splits as the run did (default: the run's rows, written beside it).")
    @argument("--output", default="runs", help="Folder that holds runs/<name>/.")
    @line_magic
    @user_errors
    def lora_export(self, line):
        """Write a standalone script (transformers + peft + trl, no ipylora) that retrains the run: same
        formatting, tokens and loss mask for every data format and template, same LoRA shape and seed.

            %lora_export sd-prompts --script train.py
        """
        opts = parse(self.lora_export, line)
        path = get_session().export_script(opts.name, opts.script, data=opts.data, output=opts.output)
        rows = f" and {data_path(path)} (the rows it trained on)" if opts.data is None else ""
        print(f"wrote {path}{rows}: run it with python {path} --output DIR; it prints its final loss beside "
              "the notebook's")

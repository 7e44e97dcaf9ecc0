"""%%lora_dataset: bring data into the session and preview what will be trained on."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from ipylora.engine import DataArgs, get_session
from ipylora.engine import plugins, sources
from ipylora.magics.args import parse
from ipylora.magics.common import user_errors


@magics_class
class DatasetMagics(Magics):
    """%%lora_dataset and %lora_dataset."""

    @magic_arguments()
    @argument("name", nargs="?", help="Name of the dataset, used by %%lora_train NAME (with --head: a file to look at).")
    @argument("--form", action="store_true", help="Show a form to paste or upload data; it shows the equivalent cell.")
    @argument("-f", "--from", dest="source", default=None,
              help="A file (csv, tsv, json, jsonl, yaml, parquet, arrow), a glob like data/*.jsonl, a "
                   "datasets.save_to_disk folder, a variable (DataFrame, Dataset, DatasetDict, list of dicts), "
                   "or a hub dataset (hf:NAME or owner/name).")
    @argument("--format", default=None,
              help="Data format: text, alpaca, prompt-completion, messages, sharegpt, preference (prompt, chosen, "
                   "rejected), unpaired-preference (prompt, completion, label) (detected from the columns).")
    @argument("--reader", default=None, help="How to parse the cell or file: csv, tsv, json, jsonl, yaml, parquet, arrow.")
    @argument("-c", "--columns", default=None,
              help="Map fields to columns: prompt=concept,response=description (preference: chosen=, rejected=; "
                   "unpaired-preference: completion=, label=).")
    @argument("-p", "--prompt", default=None, help='Prompt as a format string over the columns, e.g. "describe {concept}".')
    @argument("-r", "--response", default=None, help='Response as a format string over the columns, e.g. "{description}".')
    @argument("-t", "--template", default="human-assistant",
              help="human-assistant (default), alpaca, chatml, plain, model (the base model's chat template), "
                   "a string with {prompt} and {response}, or a .jinja file.")
    @argument("--train-on-prompt", action="store_true", help="Also put loss on the prompt tokens.")
    @argument("--response-after", default=None, metavar="MARKER",
              help='Text format: train only what follows MARKER in each row (e.g. "[/INST]"); the rest is the prompt.')
    @argument("--eval", type=float, default=None, help="Hold out this share (0.1) or number of rows (50) for evaluation.")
    @argument("--eval-from", default=None, help="Evaluation rows from another source (same forms as --from), or a split name.")
    @argument("--shuffle", action="store_true", help="Shuffle the rows (seeded) before --limit and --eval.")
    @argument("--seed", type=int, default=42, help="Seed for --shuffle and --eval.")
    @argument("--limit", type=int, default=None, help="Keep only the first N rows.")
    @argument("-n", "--show", type=int, default=3, help="How many rendered samples to show (0: none).")
    @argument("--max-length", type=int, default=1024, help="Token length the preview measures truncation against.")
    @argument("--head", type=int, nargs="?", const=5, default=None,
              help="Only look at the first N rows (5) of a file, without loading it all or defining a dataset.")
    @line_cell_magic
    @user_errors
    def lora_dataset(self, line, cell=None):
        """Define a named dataset from the cell body (CSV, TSV, JSON, JSON lines, YAML) or --from.

            %%lora_dataset concepts --prompt "generate a prompt for {concept}" --response "{description}"
            concept,description
            Machine Learning,"a glowing brain made of circuits, digital art"

            %lora_dataset alpaca --from alpaca.parquet --template alpaca --eval 0.05 --shuffle
            %lora_dataset chats --from chats.jsonl --template chatml       # messages / conversations columns
            %lora_dataset llama --from text.jsonl --response-after "[/INST]" # text rows: train the answers only
            %lora_dataset concepts --from df --columns prompt=concept,response=description
            %lora_dataset prefs --from prefs.jsonl --columns prompt=q,chosen=good,rejected=bad  # DPO pairs
            %lora_dataset concepts --show 5                                 # preview again
            %lora_dataset data/train.parquet --head                         # peek at a file
            %lora_dataset --form                                            # paste or upload in a form
        """
        opts = parse(self.lora_dataset, line)
        session = get_session()
        if opts.form:
            from ipylora.ui.forms import DatasetForm

            display(DatasetForm(shell=self.shell))
            return
        if not opts.name:
            raise UsageError("Name the dataset: %%lora_dataset NAME (then CSV/JSON below, or --from FILE|VARIABLE).")
        has_body = cell is not None and cell.strip()
        if opts.head is not None:
            return self._head(opts)
        if opts.source is None and not has_body:
            if cell is None and opts.name in session.datasets:
                return self._preview(session.dataset(opts.name), opts)
            raise UsageError(
                f"No data for {opts.name!r}: put CSV/JSON/YAML under %%lora_dataset, or pass --from FILE|VARIABLE."
            )
        if opts.source is not None and has_body:
            raise UsageError("Give the data either in the cell body or with --from, not both.")
        reader, data_format = _reader_and_format(opts)
        if has_body:
            data = sources.read_text(cell, reader)
        else:
            data = sources.resolve(opts.source, self.shell.user_ns, reader)
        if opts.eval_from is not None:
            if isinstance(data, dict) and opts.eval_from in data:
                held_out = data[opts.eval_from]
            else:
                held_out = sources.resolve(opts.eval_from, self.shell.user_ns, reader)
            train = data.get("train", next(iter(data.values()))) if isinstance(data, dict) else data
            held_out = held_out.get("validation", held_out.get("test", next(iter(held_out.values())))) \
                if isinstance(held_out, dict) else held_out
            data = {"train": train, "eval": held_out}
        data_args = DataArgs(prompt=_unescape(opts.prompt), response=_unescape(opts.response),
                             template=_unescape(opts.template),
                             train_on_prompt=opts.train_on_prompt, format=data_format, columns=opts.columns,
                             eval=opts.eval, eval_from=opts.eval_from, shuffle=opts.shuffle, limit=opts.limit,
                             seed=opts.seed, source=opts.source or "cell",
                             response_after=_unescape(opts.response_after))
        dataset = session.add_dataset(opts.name, data, data_args)
        for note in sources.notes(data):
            print(f"note: {note}")
        return self._preview(dataset, opts)

    def _preview(self, dataset, opts):
        from ipylora.ui.preview import dataset_preview

        tokenizer, tokenizer_name = get_session().preview_tokenizer()
        display(dataset_preview(dataset, tokenizer, tokenizer_name, opts.max_length, samples=max(0, opts.show)))

    def _head(self, opts):
        from ipylora.ui.preview import head_table

        spec = opts.source or opts.name
        frame, total = sources.peek(spec, max(1, opts.head), self.shell.user_ns)
        display(head_table(frame, total, spec))


def _reader_and_format(opts) -> tuple[str | None, str | None]:
    """--format used to name the reader (csv, json, ...): still accepted when it is not a data format."""
    fmt = opts.format
    if fmt is not None and opts.reader is None and fmt in plugins.names(plugins.READERS) \
            and fmt not in plugins.names(plugins.FORMATS):
        return fmt, None
    return opts.reader, fmt


def _unescape(value: str | None) -> str | None:
    """`\\n` and `\\t` typed in a magic line mean a newline and a tab (shell quoting keeps them literal)."""
    return value.replace("\\n", "\n").replace("\\t", "\t") if value else value

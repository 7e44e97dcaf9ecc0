"""%%lora_dataset: bring data into the session and preview what will be trained on."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from ipylora.engine import DataArgs, get_session
from ipylora.engine import sources
from ipylora.magics.args import parse
from ipylora.magics.common import user_errors

@magics_class
class DatasetMagics(Magics):
    """%%lora_dataset and %lora_dataset."""

    @magic_arguments()
    @argument("name", help="Name of the dataset, used by %%lora_train NAME.")
    @argument("--from", dest="source", default=None,
              help="A csv/tsv/json/jsonl/parquet file, or a variable holding a DataFrame or list of dicts.")
    @argument("--format", default=None, help="Format of the cell body: csv, tsv, json or jsonl (detected if omitted).")
    @argument("--prompt", default=None, help='Prompt as a format string over the columns, e.g. "describe {concept}".')
    @argument("--response", default=None, help='Response as a format string over the columns, e.g. "{description}".')
    @argument("--template", default="human-assistant",
              help="human-assistant (default), alpaca, plain, or a string with {prompt} and {response}.")
    @argument("--train-on-prompt", action="store_true", help="Also put loss on the prompt tokens.")
    @argument("--show", type=int, default=3, help="How many rendered samples to show (0: none).")
    @argument("--max-length", type=int, default=1024, help="Token length the preview measures truncation against.")
    @line_cell_magic
    @user_errors
    def lora_dataset(self, line, cell=None):
        """Define a named dataset from the cell body (CSV, JSON list, JSON lines) or --from.

            %%lora_dataset concepts --prompt "generate a prompt for {concept}" --response "{description}"
            concept,description
            Machine Learning,"a glowing brain made of circuits, digital art"

            %lora_dataset concepts --from data/concepts.csv
            %lora_dataset concepts --show 5
        """
        opts = parse(self.lora_dataset, line)
        session = get_session()
        has_body = cell is not None and cell.strip()
        if opts.source is None and not has_body:
            if opts.name in session.datasets and cell is None:
                return self._preview(session.dataset(opts.name), opts)
            raise UsageError(
                f"No data for {opts.name!r}: put CSV/JSON under %%lora_dataset, or pass --from FILE|VARIABLE."
            )
        if opts.source is not None and has_body:
            raise UsageError("Give the data either in the cell body or with --from, not both.")
        if has_body:
            frame = sources.read_text(cell, opts.format)
        elif opts.source in self.shell.user_ns:
            frame = sources.read_object(self.shell.user_ns[opts.source])
        else:
            frame = sources.read_path(opts.source)
        data_args = DataArgs(prompt=opts.prompt, response=opts.response, template=opts.template,
                             train_on_prompt=opts.train_on_prompt)
        dataset = session.add_dataset(opts.name, frame, data_args)
        return self._preview(dataset, opts)

    def _preview(self, dataset, opts):
        from ipylora.ui.render import dataset_preview

        tokenizer, tokenizer_name = get_session().preview_tokenizer()
        display(dataset_preview(dataset, tokenizer, tokenizer_name, opts.max_length, samples=max(0, opts.show)))

/**
 * The commands ipylora adds (palette, notebook toolbar and context menu,
 * launcher). Each one is a thin call into the model or the notebook API.
 */

import { JupyterFrontEnd } from '@jupyterlab/application';
import { ToolbarButton } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { IDisposable } from '@lumino/disposable';
import { ReadonlyPartialJSONObject } from '@lumino/coreutils';

import { LoraModel } from './model';
import { LoraPanel, loraIcon } from './panel';
import quickstart from './quickstart.json';

export namespace CommandIDs {
  export const insertDataset = 'ipylora:insert-dataset-cell';
  export const stopTraining = 'ipylora:stop-training';
  export const openSidebar = 'ipylora:open-sidebar';
  export const newNotebook = 'ipylora:new-notebook';
}

export const PALETTE_CATEGORY = 'LoRA (ipylora)';

/** What "Insert LoRA dataset cell" puts in the notebook. */
export const DATASET_TEMPLATE = [
  '%%lora_dataset concepts --template human-assistant --prompt "generate a stable diffusion prompt for {concept}" --response "{description}"',
  'concept,description',
  'Machine Learning,"A branch of artificial intelligence where systems learn patterns from data, digital art"',
  'Neural Networks,"Layers of interconnected nodes passing signals, luminous web of neurons"'
].join('\n');

export function addCommands(
  app: JupyterFrontEnd,
  tracker: INotebookTracker,
  model: LoraModel,
  panel: LoraPanel
): void {
  const { commands } = app;
  const hasNotebook = (): boolean => tracker.currentWidget !== null;

  commands.addCommand(CommandIDs.insertDataset, {
    label: 'Insert LoRA Dataset Cell',
    caption: 'Insert a %%lora_dataset cell below the active cell',
    icon: args => (args['toolbar'] ? loraIcon : undefined),
    isEnabled: hasNotebook,
    execute: () => {
      const current = tracker.currentWidget;
      if (!current) {
        return;
      }
      const notebook = current.content;
      NotebookActions.insertBelow(notebook);
      NotebookActions.changeCellType(notebook, 'code');
      notebook.activeCell?.model.sharedModel.setSource(DATASET_TEMPLATE);
    }
  });

  commands.addCommand(CommandIDs.stopTraining, {
    label: 'Stop LoRA Training',
    caption: 'Stop the running ipylora training at the next step (the adapter is kept)',
    isEnabled: () => model.canStop,
    execute: () => model.stop()
  });

  commands.addCommand(CommandIDs.openSidebar, {
    label: 'Open LoRA Sidebar',
    execute: () => {
      app.shell.activateById(panel.id);
    }
  });

  commands.addCommand(CommandIDs.newNotebook, {
    label: args => (args['isLauncher'] ? 'LoRA fine-tuning notebook' : 'New LoRA Fine-Tuning Notebook'),
    caption: 'Create a notebook from the ipylora quickstart',
    icon: args => (args['isPalette'] ? undefined : loraIcon),
    execute: async (args: ReadonlyPartialJSONObject) => {
      const cwd = typeof args['cwd'] === 'string' ? args['cwd'] : '';
      const contents = app.serviceManager.contents;
      const created = await contents.newUntitled({ path: cwd, type: 'notebook' });
      await contents.save(created.path, {
        type: 'notebook',
        format: 'json',
        content: quickstart
      });
      return commands.execute('docmanager:open', { path: created.path, factory: 'Notebook' });
    }
  });

  // Keep enabled states (palette, menus) in step with the kernel state.
  model.changed.connect(() => commands.notifyCommandChanged(CommandIDs.stopTraining));
}

/** Adds the toolbar buttons to every notebook. */
export class NotebookButtons {
  constructor(app: JupyterFrontEnd) {
    this._app = app;
  }

  createNew(panel: NotebookPanel): IDisposable {
    const run = (id: string) => () => {
      this._app.commands.execute(id).catch((reason: unknown) => {
        console.warn(`ipylora: ${id} failed`, reason);
      });
    };
    const insert = new ToolbarButton({
      className: 'jp-ipylora-insert-dataset',
      icon: loraIcon,
      label: 'Dataset',
      tooltip: 'Insert a %%lora_dataset cell',
      onClick: run(CommandIDs.insertDataset)
    });
    panel.toolbar.insertItem(10, 'ipylora-insert-dataset', insert);
    return insert;
  }

  private _app: JupyterFrontEnd;
}

/**
 * Wiring only: the plugins, what they need, and where their pieces go.
 * Kernel traffic is in model.ts, the view in panel.ts, highlighting in
 * highlight.ts, commands in commands.ts.
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { EditorExtensionRegistry, IEditorExtensionRegistry } from '@jupyterlab/codemirror';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker } from '@jupyterlab/notebook';

import { CommandIDs, NotebookButtons, PALETTE_CATEGORY, addCommands } from './commands';
import { datasetHighlighting } from './highlight';
import { LoraModel } from './model';
import { LoraPanel } from './panel';

const sidebar: JupyterFrontEndPlugin<void> = {
  id: 'ipylora:sidebar',
  description: 'The LoRA sidebar and commands, following the active notebook kernel.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILauncher, ILayoutRestorer, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    restorer: ILayoutRestorer | null,
    labShell: ILabShell | null
  ) => {
    const model = new LoraModel();
    const panel = new LoraPanel(model);
    app.shell.add(panel, 'right', { rank: 1000 });
    restorer?.add(panel, panel.id);

    // Follow the notebook the user looks at; keep the last one while another
    // kind of document (a terminal, a text file) has focus.
    const follow = (): void => {
      const current = tracker.currentWidget;
      if (current) {
        model.setSessionContext(current.sessionContext);
      } else if (tracker.size === 0) {
        model.setSessionContext(null);
      }
    };
    tracker.currentChanged.connect(follow);
    tracker.widgetAdded.connect(follow);
    labShell?.currentChanged.connect(follow);
    follow();

    addCommands(app, tracker, model, panel);
    for (const command of [
      CommandIDs.insertDataset,
      CommandIDs.stopTraining,
      CommandIDs.openSidebar,
      CommandIDs.newNotebook
    ]) {
      palette?.addItem({ command, category: PALETTE_CATEGORY, args: { isPalette: true } });
    }
    launcher?.add({
      command: CommandIDs.newNotebook,
      category: 'Notebook',
      rank: 100,
      args: { isLauncher: true }
    });
    app.contextMenu.addItem({ command: CommandIDs.insertDataset, selector: '.jp-Notebook', rank: 20 });
    app.contextMenu.addItem({ command: CommandIDs.stopTraining, selector: '.jp-Notebook', rank: 21 });
    app.docRegistry.addWidgetExtension('Notebook', new NotebookButtons(app));
  }
};

const highlighting: JupyterFrontEndPlugin<void> = {
  id: 'ipylora:highlighting',
  description: 'Highlights %%lora_dataset cells as CSV, JSON or YAML.',
  autoStart: true,
  requires: [IEditorExtensionRegistry],
  activate: (_app: JupyterFrontEnd, extensions: IEditorExtensionRegistry) => {
    extensions.addExtension({
      name: 'ipylora:dataset-cells',
      factory: () => EditorExtensionRegistry.createImmutableExtension(datasetHighlighting())
    });
  }
};

export default [sidebar, highlighting];

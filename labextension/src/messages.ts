/**
 * The sentence the sidebar shows for each connection state; kept apart from
 * the view so the wording is unit tested.
 */

import type { ConnectionState } from './model';

/** Message shown instead of the state, one per connection kind. */
export function connectionMessage(connection: ConnectionState): string | null {
  switch (connection.kind) {
    case 'no-notebook':
      return 'Open a notebook to see its LoRA state.';
    case 'no-kernel':
      return 'This notebook has no kernel. Select a Python kernel, then run %load_ext ipylora.';
    case 'connecting':
      return 'Connecting to the kernel…';
    case 'dead':
      return 'The kernel is dead. Restart it (Kernel ▸ Restart Kernel…), then run %load_ext ipylora.';
    case 'not-loaded':
      return (
        (connection.restarted ? 'The kernel restarted. ' : '') +
        'ipylora is not loaded in this kernel — run %load_ext ipylora'
      );
    case 'ready':
      return null;
  }
}

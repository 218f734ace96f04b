//! What each key does to the live view's state.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::{
    app::App,
    column::{Column, Sort},
};

/// What the main loop should do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    None,
    Quit,
}

impl App {
    /// Handles one key; `page` is the number of table rows on screen (for PageUp/PageDown).
    pub(crate) fn on_key(&mut self, key: KeyEvent, page: usize) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.filter_input.is_some() {
            self.on_filter_key(key.code);
            return Action::None;
        }
        let page = isize::try_from(page.max(1)).unwrap_or(isize::MAX);
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc if self.detail => self.detail = false,
            KeyCode::Esc if !self.filter.is_empty() => {
                self.set_filter("");
            }
            KeyCode::Char('/') => self.filter_input = Some(self.filter.text.clone()),
            KeyCode::Char('p' | ' ') => self.set_paused(!self.paused),
            KeyCode::Enter => self.detail = !self.detail && self.selected_row().is_some(),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-page),
            KeyCode::PageDown => self.move_selection(page),
            KeyCode::Home | KeyCode::Char('g') => self.select(0),
            KeyCode::End | KeyCode::Char('G') => self.select(usize::MAX),
            KeyCode::Char('<') | KeyCode::Left => self.set_sort(Sort {
                column: self.sort.column.shifted(-1),
                descending: self.sort.descending,
            }),
            KeyCode::Char('>') | KeyCode::Right => self.set_sort(Sort {
                column: self.sort.column.shifted(1),
                descending: self.sort.descending,
            }),
            KeyCode::Char('r') => self.set_sort(Sort {
                column: self.sort.column,
                descending: !self.sort.descending,
            }),
            // 1..9 pick a column; the same one again reverses.
            KeyCode::Char(c @ '1'..='9') => {
                let column = Column::ALL[c as usize - '1' as usize];
                let descending = self.sort.column == column && !self.sort.descending;
                self.set_sort(Sort { column, descending });
            }
            _ => {}
        }
        Action::None
    }

    /// A key while the filter is being typed after `/`.
    fn on_filter_key(&mut self, code: KeyCode) {
        let Some(input) = &mut self.filter_input else {
            return;
        };
        match code {
            KeyCode::Enter => {
                let text = input.clone();
                if self.set_filter(&text) {
                    self.filter_input = None;
                }
            }
            KeyCode::Esc => {
                self.filter_input = None;
                self.filter_error = None;
            }
            KeyCode::Backspace => {
                input.pop();
            }
            KeyCode::Char(c) => input.push(c),
            _ => {}
        }
    }
}

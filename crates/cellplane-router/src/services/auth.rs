//! etcd's `Auth/Authenticate` on the router: a tenant's or an operator's password
//! for a token, which etcd clients then send as `token` metadata (`etcdctl --user
//! acme:secret`, the Rust `etcd-client` with `ConnectOptions::with_user`).

use std::sync::Arc;

use cellplane_proto::etcdserverpb::auth_server::Auth;
use cellplane_proto::etcdserverpb::{AuthenticateRequest, AuthenticateResponse, ResponseHeader};
use tonic::{Request, Response, Status};

use crate::auth::Authenticator;

pub struct RouterAuth {
    auth: Arc<Authenticator>,
}

impl RouterAuth {
    pub fn new(auth: Arc<Authenticator>) -> RouterAuth {
        RouterAuth { auth }
    }
}

#[tonic::async_trait]
impl Auth for RouterAuth {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let req = request.into_inner();
        let token = self.auth.login(&req.name, &req.password).await?;
        Ok(Response::new(AuthenticateResponse {
            header: Some(ResponseHeader::default()),
            token,
        }))
    }
}
